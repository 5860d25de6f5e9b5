"""Bridges to other systems. Each submodule imports its system lazily (``inferneo.integrations.ray`` needs
``pip install "inferneo[ray]"``); importing this package imports none of them."""
