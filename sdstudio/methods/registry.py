"""Every training method, imported explicitly (no directory scans). Add a line when you add a method."""
# isort: off
# The training-engine issue adds: lora, dreambooth, full.
# The concepts issue adds: textual_inversion, pivotal, edlora (and lycoris / adalora when they land).
from . import lora  # noqa: F401,E402
from . import dreambooth  # noqa: F401,E402
from . import full  # noqa: F401,E402
from . import textual_inversion  # noqa: F401,E402
from . import edlora  # noqa: F401,E402
from . import pivotal  # noqa: F401,E402
# The conditioning issue adds: controlnet, t2i_adapter (they train on batch.cond["control"]).
from . import controlnet  # noqa: F401,E402
from . import t2i_adapter  # noqa: F401,E402
# The GLIGEN issue adds: gligen (trains the gated layers on batch.cond["boxes"]).
from . import gligen  # noqa: F401,E402
