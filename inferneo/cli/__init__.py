"""The ``inferneo`` command line, one module a command:

- ``main``: the console script (``inferneo = "inferneo.cli.main:main"``): the parser and the dispatch;
- ``generate``: ``inferneo generate`` and ``inferneo chat`` (a model in this process);
- ``serve``: ``inferneo serve`` (the OpenAI-compatible HTTP server);
- ``batch``: ``inferneo batch`` (an OpenAI batch file, against a server or in this process);
- ``bench``: ``inferneo bench serve | batch-sizes | throughput``.

Only ``main`` imports the others; the engine flags come from ``inferneo.config``. ``python -m inferneo.cli`` runs
the same as ``inferneo``. Nothing here imports PyTorch before a command that runs a model starts.
"""
