"""soar plan: size a deployment before buying or renting it.

``catalog.json`` (hardware, each figure with its source) and ``models.json`` (well-known model
shapes, dense and MoE) are data; ``model_shape`` reads a model's shape (GQA or MLA attention,
experts), ``hardware`` the catalog and this machine (measured by ``measure``), ``collectives``
prices all-reduces and all-to-alls over the node and inter-node links, ``roofline`` predicts step
times, ``planner`` turns them into batch, throughput and cost per hardware and tensor-parallel
degree, ``layouts`` does the same for every TP x DP (x EP) layout of a device budget,
``long_context`` sizes context parallel for one long request, ``calibrate`` fits the efficiency
factors to soar bench results, and ``report`` renders the tables and the plot.
"""
