"""Security checks of a config, run by :func:`spin_ray.config.from_dict` (issue 23, finding 8).

- **No credentials in URLs.** pyarrow and fsspec accept ``s3://KEY:SECRET@bucket/...``, but the
  config is written to ``config.yaml``, ``prepared/DONE``, logs and error messages, so a key
  in a URL would end up in all of them. Every string of the config that looks like a URL with
  a user part is refused, naming the key (the secret is never echoed). Credentials come from
  the storage's own chain: ``AWS_PROFILE``, an instance profile, IRSA or Pod Identity for
  ``s3://``; ``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server for ``gs://``.
- **Names that become folders of the run directory stay inside it** (issue 19, item 6): the
  names of ``eval.models`` (``eval/<model>/``), of ``eval.scorers`` (and the keys of
  ``eval.scorer_paths`` / ``eval.scorer_options``) and of ``self_play.baselines``
  (``baseline_<name>/``) must be plain names (:func:`check_plain_name`): letters, digits, ``_``,
  ``.``, ``-``, starting with a letter or digit, without ``..``, so none can climb out (``../x``)
  or reach another place (``a/b``). :meth:`spin_ray.rundir.RunDir.fs_path` refuses ``..`` again.
- **HPSv2's ``model_name`` names an architecture open_clip ships**, never a hub download
  (``hf-hub:org/name``) or another schema (``local-dir:...``): it must be one of the names in
  open_clip's ``model_configs`` folder (what ``open_clip.list_models()`` lists, read without
  importing open_clip), or of :data:`HPSV2_MODEL_NAMES` when open_clip is not installed.
  :func:`spin_ray.rewards.hps.load_hpsv2` checks ``open_clip.list_models()`` again.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spin_ray.config import ConfigError

HPSV2_MODEL_NAMES = ("ViT-H-14",)
"""Accepted ``eval.scorer_options.hpsv2.model_name`` values when open_clip is not installed:
the architecture of the published HPS v2 and v2.1 weights."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^@\s]*:[^@\s]*@")
"""``scheme://user:secret@`` even when the secret holds a ``/`` (an AWS secret key may)."""


def check_config_security(values: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` (one line naming the key) for credentials in a URL or an
    HPSv2 ``model_name`` that is not a shipped open_clip architecture. ``values`` is the
    config as plain nested dicts (:func:`spin_ray.config.to_dict`)."""
    for key, text in _strings(values, ""):
        if url_has_credentials(text):
            raise ConfigError(f"{key}: {redact_url(text)} carries credentials in the URL; remove them and let "
                              f"the storage's own credential chain supply them (AWS_PROFILE, an instance "
                              f"profile, IRSA; GOOGLE_APPLICATION_CREDENTIALS), docs/SECURITY.md")
    check_path_names(values)
    hps = values.get("eval", {}).get("scorer_options", {}).get("hpsv2", {})
    if "model_name" in hps:
        check_open_clip_name(hps["model_name"], "eval.scorer_options.hpsv2.model_name")


NAMES_AS_KEYS = ("eval.models", "eval.scorer_paths", "eval.scorer_options")
"""Config mappings whose keys name folders (or may): each key must be a plain name."""
NAMES_AS_ITEMS = ("eval.scorers", "self_play.baselines")
"""Config lists whose items name folders: each item must be a plain name."""
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_path_names(values: dict[str, Any]) -> None:
    """Every name of :data:`NAMES_AS_KEYS` and :data:`NAMES_AS_ITEMS` is a plain name."""
    for dotted in NAMES_AS_KEYS + NAMES_AS_ITEMS:
        section, _, field_name = dotted.partition(".")
        found = values.get(section, {}).get(field_name)
        if isinstance(found, dict):
            for name in found:
                check_plain_name(name, f"{dotted}.{name}")
        elif isinstance(found, list):
            for index, name in enumerate(found):
                check_plain_name(name, f"{dotted}[{index}]")


def check_plain_name(name: Any, key: str) -> str:
    """``name`` if it is safe as one folder name (letters, digits, ``_.-``, starting with a letter
    or digit, no ``..``); else a :class:`ConfigError` naming ``key``."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or ".." in name:
        raise ConfigError(f"{key}: {name!r} becomes a folder name in the run directory; use letters, digits, "
                          f"'_', '.', '-' only, starting with a letter or digit, without '..' (docs/SECURITY.md)")
    return name


def url_has_credentials(text: str) -> bool:
    """Whether ``text`` is a URL with a user (and maybe a secret) before its host."""
    if not _URL.match(text):
        return False
    return "@" in urlsplit(text).netloc or _USERINFO.match(text) is not None


def redact_url(text: str) -> str:
    """``s3://KEY:SECRET@bucket/x`` -> ``s3://***@bucket/x`` (for error messages)."""
    scheme, rest = text.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[-1]}"


def check_open_clip_name(name: Any, key: str) -> None:
    """``name`` must be an architecture open_clip ships (or in :data:`HPSV2_MODEL_NAMES`
    without open_clip); schema prefixes such as ``hf-hub:`` are refused first."""
    if not isinstance(name, str) or ":" in name or "/" in name:
        raise ConfigError(f"{key}: {name!r} is not an open_clip architecture name; hub and path names "
                          f"(hf-hub:..., local-dir:...) would download or read weights and are refused")
    known = open_clip_model_names()
    allowed = known if known is not None else frozenset(HPSV2_MODEL_NAMES)
    if name not in allowed:
        source = "open_clip.list_models()" if known is not None else "the allow-list (open_clip is not installed)"
        raise ConfigError(f"{key}: {name!r} is not in {source}; e.g. ViT-H-14 (the published HPSv2 weights)")


@functools.lru_cache(maxsize=1)
def open_clip_model_names() -> frozenset[str] | None:
    """The architectures open_clip ships (its ``model_configs/*.json``), without importing it
    (that would import torch); None when open_clip is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    names = frozenset(path.stem for path in (Path(spec.origin).parent / "model_configs").glob("*.json"))
    return names or None


def _strings(value: Any, key: str) -> Iterator[tuple[str, str]]:
    """(dotted key, string) for every string in nested dicts and lists; dict keys count too."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for name, item in value.items():
            child = f"{key}.{name}" if key else str(name)
            if isinstance(name, str):
                yield child, name
            yield from _strings(item, child)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _strings(item, f"{key}[{index}]")
