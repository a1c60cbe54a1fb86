"""Every training method, imported explicitly (no directory scans), and the lookup by name. Add a line when you add
a method. (methods/base.py holds the registry itself and `register`, so no method module imports this one.)"""
from ..errors import UserError
from .base import REGISTRY

# isort: off
# The training-engine issue adds: lora, dreambooth, full.
# The concepts issue adds: textual_inversion, pivotal, edlora; the LyCORIS issue: lycoris (loha, lokr, dora), adalora.
from . import lora  # noqa: F401,E402
from . import dreambooth  # noqa: F401,E402
from . import full  # noqa: F401,E402
from . import textual_inversion  # noqa: F401,E402
from . import edlora  # noqa: F401,E402
from . import pivotal  # noqa: F401,E402
from . import controlnet  # noqa: F401,E402
from . import t2i_adapter  # noqa: F401,E402
from . import lycoris  # noqa: F401,E402
from . import adalora  # noqa: F401,E402
from . import gligen  # noqa: F401,E402  (trains the gated layers on batch.cond["boxes"])


def get_method(name: str) -> type:
    try:
        return REGISTRY[name]
    except KeyError:
        import difflib

        near = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise UserError(f"Unknown method {name!r}: use one of {', '.join(sorted(REGISTRY))}.{hint}") from None


def all_methods() -> dict[str, type]:
    return dict(REGISTRY)
