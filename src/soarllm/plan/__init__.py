"""soar plan: size a deployment before buying or renting it.

``catalog.json`` (hardware, each figure with its source) and ``models.json`` (well-known model
shapes) are data; ``model_shape`` reads a model's shape, ``hardware`` the catalog and this machine
(measured by ``measure``), ``roofline`` predicts step times, ``planner`` turns them into batch,
throughput and cost per hardware and tensor-parallel degree, ``calibrate`` fits the efficiency
factors to soar bench results, and ``report`` renders the table and the plot.
"""
