"""The demo's mergekit recipes: templates in ``configs/demo/<merge set>/<method>.yml``.

A template is an ordinary mergekit recipe whose run-dependent values are ``${name}`` fields:
``${path_base}``, ``${path_instruction}``, … (the directories of the built models the
merge takes: a seed's task models, with the heterogeneous setting's candidate in place of its model), ``${lambda}`` and ``${rho}`` (picked on
the validation items), and for fednova ``${steps_<model>}`` and ``${learning_rate_<model>}``
(what training recorded in the models' manifest). ``fill_template`` substitutes them and
``fedmerge demo`` writes the result, a complete recipe, to ``<out>/recipes/``: those are the
files it merges with (and ``mergekit-yaml`` runs as they are).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import yaml

from fedmerge_plugins.catalogue import SEARCH_METHODS

METHODS = SEARCH_METHODS
# merge set name -> task models, in the paper's order (Table 5)
MERGE_SETS: Dict[str, Tuple[str, ...]] = {
    "math-code": ("math", "code"),
    "instruction-math": ("instruction", "math"),
    "instruction-code": ("instruction", "code"),
    "instruction-math-code": ("instruction", "math", "code"),
}


def templates_dir() -> Path:
    """``configs/demo`` of this checkout, or ``recipe_templates/`` beside this module (a wheel's copy)."""
    here = Path(__file__).resolve().parent
    candidates = (here.parents[1] / "configs" / "demo", here / "recipe_templates")
    for directory in candidates:
        if directory.is_dir():
            return directory
    raise FileNotFoundError(f"the demo's recipe templates are missing: none of {', '.join(map(str, candidates))}")


def template_path(merge_set: str, method: str, directory: Path | None = None) -> Path:
    return (directory or templates_dir()) / merge_set / f"{method}.yml"


def yaml_scalar(value: object) -> str:
    """A number as YAML reads it back (PyYAML reads ``3e-05`` as text, ``3.0e-05`` as a float)."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def template_fields(text: str) -> List[str]:
    """The ``${name}`` fields of a template's recipe lines (comments are left as they are)."""
    lines = [line for line in text.splitlines() if not _is_comment(line)]
    return sorted({m.group("braced") for m in string.Template.pattern.finditer("\n".join(lines)) if m.group("braced")})


def fill_template(text: str, values: Mapping[str, object], where: str = "template", header: str = "") -> str:
    """Substitute every ``${name}`` outside comments; a field without a value is an error
    naming it. ``header`` (comment lines) goes first."""
    missing = [name for name in template_fields(text) if name not in values]
    if missing:
        raise KeyError(f"{where}: no value for {', '.join('${' + m + '}' for m in missing)}")
    rendered = {k: v if isinstance(v, str) else yaml_scalar(v) for k, v in values.items()}
    lines = [
        line if _is_comment(line) else string.Template(line).substitute(rendered)
        for line in text.splitlines(keepends=True)
    ]
    return header + "".join(lines)


def recipe_values(
    models_dir: Path, paths: Mapping[str, str], entries: Mapping[str, dict], parameters: Mapping[str, float]
) -> Dict[str, object]:
    """The values a template can ask for: each model's directory (``path_<name>``, from
    ``paths``: name -> directory under ``models_dir``), each task model's recorded steps and
    learning rate (``entries``: its manifest entry), and the chosen ``lambda`` / ``rho``."""
    values: Dict[str, object] = {f"path_{name}": str((models_dir / path).resolve()) for name, path in paths.items()}
    for name, entry in entries.items():
        values[f"steps_{name}"] = int(entry["training"]["steps"])
        values[f"learning_rate_{name}"] = float(entry["training"]["learning_rate"])
    values.update(parameters)
    return values


def write_recipe(
    out_dir: Path,
    merge_set: str,
    method: str,
    values: Mapping[str, object],
    *,
    header: str = "",
    templates: Path | None = None,
) -> Path:
    """Fill ``configs/demo/<merge_set>/<method>.yml`` and write it to ``out_dir/<merge_set>/<method>.yml``."""
    source = template_path(merge_set, method, templates)
    text = fill_template(source.read_text(), values, str(source), header)
    path = out_dir / merge_set / f"{method}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
