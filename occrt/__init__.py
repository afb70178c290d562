"""occrt: LLM compression in operator coordinates, and a light runtime for the .occ container.

    import occrt
    model = occrt.load("model.occ")
    print(model.generate("The capital of France is", max_new_tokens=16))
"""
__version__ = "0.1.0"

from occrt.api import Model, load  # noqa: E402  (the version must exist before submodules import it)
from occrt.completion import Completion, CompletionStream  # noqa: E402
from occrt.errors import FormatError, OccError  # noqa: E402

__all__ = ["Completion", "CompletionStream", "FormatError", "Model", "OccError", "load", "__version__"]
