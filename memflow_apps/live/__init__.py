"""``memflow live``: a local web page that streams a video as it is made, takes prompts while it
plays and shows what the memory holds (``server.py``: the ASGI app; ``session.py``: the one
generation it runs; ``messages.py``: what goes over its websocket; ``page/``: the page)."""
