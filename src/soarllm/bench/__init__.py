"""soar bench: LACE (latency, accuracy, capacity, ease) measured for any OpenAI-compatible server.

Modules, one concept each: ``workloads`` (what to send), ``arrivals`` (when to send it),
``client`` (one streamed request, timed), ``metrics`` (vLLM's definitions), ``runner`` (one load
point), ``sweep`` (load sweeps and capacity), ``launch`` (servers we start: ease), ``report`` and
``plots`` (JSON, Markdown, PNG), ``offline`` (the engine through ``LLM`` without HTTP).
"""
