"""The bench wing: benchmarks and demos built on elastikv, never imported by the core, the engines or serving.

``elastikv demo`` (``demo.py``), ``elastikv cache-demo`` (``cache_demo.py``), ``elastikv bench multi-model``
(``multi_model.py`` and the modules it names) and ``elastikv make-model`` (``models.py``) run from here; the
traces they replay are ``workload.py``'s, through the router by ``replay.py``.
"""
