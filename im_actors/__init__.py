"""im-actors: an instant-messaging backend built on Ray actors.

See DESIGN.md (roles, message path, invariants) and PROTOCOL.md (the client contract).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
