"""The applications built on memflow_adapter: the ``memflow`` command (:mod:`.cli`), the
long-video benchmark (:mod:`.eval`), the narrative world (:mod:`.world`), and what two of them
share (:mod:`.shared`). The library (``memflow_adapter``, ``integrations``) imports none of
them; they import the library, ``memflow_apps.shared`` and never each other
(``tests/test_layering.py``)."""
