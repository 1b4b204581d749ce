"""The socket API's routes, one FastAPI router per concern; ``transport.http.create_app`` composes them.

Each module's ``router(state)`` returns an :class:`fastapi.APIRouter` whose handlers close over the
daemon's :class:`~edgert.transport.shared.ApiState` (state on the app, never in module globals).
"""
