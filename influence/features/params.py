"""Which parameters to take gradients for: ``all``, ``last:N`` modules, or a list of names."""

from __future__ import annotations

from torch import nn

from influence.errors import BadSpecError


def select_parameters(model: nn.Module, selection: str = "all") -> list[str]:
    """Parameter names (in model order) chosen by ``selection``.

    ``last:N`` takes the parameters of the last N modules that own parameters
    (the head first: what most TDA papers use when full gradients are too big).
    Otherwise a comma list of parameter names or module-name prefixes.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if selection in ("", "all"):
        chosen = names
    elif selection.startswith("last:"):
        try:
            count = int(selection.split(":", 1)[1])
        except ValueError:
            raise BadSpecError(f"--params {selection!r}: expected last:N with an integer N") from None
        owners = [m for m, mod in model.named_modules() if any(True for _ in mod.parameters(recurse=False))]
        if count < 1 or count > len(owners):
            raise BadSpecError(f"--params {selection!r}: N must be between 1 and {len(owners)} (modules with parameters)")
        keep = set(owners[-count:])
        chosen = [n for n in names if n.rpartition(".")[0] in keep]
    else:
        wanted = [w.strip() for w in selection.split(",") if w.strip()]
        chosen = [n for n in names if any(n == w or n.startswith(w + ".") for w in wanted)]
        missing = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n in names)]
        if missing:
            raise BadSpecError(f"--params: no parameter matches {missing}; the model has {names[:8]}{'...' if len(names) > 8 else ''}")
    if not chosen:
        raise BadSpecError(f"--params {selection!r} selects no trainable parameters")
    return chosen
