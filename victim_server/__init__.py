"""The victim service: an Open Inference Protocol v2 API with keys, budgets and defenses.

Build it with :func:`victim_server.app.create_app` from
:class:`victim_server.settings.ServerSettings`; run it with ``stealsim serve``.
"""

__all__: list[str] = []
