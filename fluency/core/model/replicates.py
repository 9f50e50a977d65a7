"""Replicate models: which checkpoints are the same configuration trained from different seeds.

Two trained checkpoints are *replicates* when everything that shapes the model is the same except the
seed. Their ``configuration`` is 12 hex digits of the sha256 of that everything
(:func:`configuration_fields`): the resolved architecture, loss, optimizer and constraints records of
the checkpoint, the data fingerprint and preprocessing (the images' content, not their folder), and the
training settings other than :data:`IGNORED_SETTINGS`. ``fluency train`` writes the id into every
checkpoint it saves (``info["replicate"] = {"configuration": ID}``); ``fluency train --replicate-of NAME``
writes ``NAME`` instead, so that models the hash would tell apart can be declared replicates by hand.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fluency.core.errors import OptionError
from fluency.core.hashing import options_hash

#: training settings that do not change the model a configuration trains (the seed is what replicates vary;
#: where files go, the device, the decoding workers, the figures and intermediate checkpoints change nothing
#: learned), or that are recorded resolved elsewhere in the checkpoint (the images by the data fingerprint, ``-o``
#: and ``--lr`` by the plugins' resolved options, the loss names by the loss terms)
IGNORED_SETTINGS = frozenset({"seed", "out", "images", "device", "figures", "checkpoint_every", "options", "lr",
                              "losses", "workers"})
#: settings added after checkpoints recorded configurations, with the value that trains as before: at that value
#: a setting is left out of the hash, so that the configuration of earlier checkpoints keeps its id
ADDED_SETTINGS = {"amp": "off"}
#: the checkpoint records that describe the trained model, hashed as they are
MODEL_RECORDS = ("architecture", "loss", "optimizer", "constraints")
#: what an explicit ``--replicate-of`` label may look like
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_label(name: str, where: str = "--replicate-of") -> str:
    """``name`` if it is a usable configuration label (letters, digits, ``.``, ``_``, ``-``; at most 64), else
    one :class:`OptionError` line."""
    if not isinstance(name, str) or not LABEL.fullmatch(name):
        raise OptionError(f"{where} {name!r}: a configuration label is 1 to 64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return name


def _training_config(info: Mapping[str, Any]) -> Mapping[str, Any] | None:
    training = info.get("training")
    config = training.get("config") if isinstance(training, Mapping) else None
    return config if isinstance(config, Mapping) else None


def configuration_fields(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a checkpoint's configuration id is the hash of, or None for a model without a training
    configuration (built by ``--model``, or saved by another tool)."""
    config = _training_config(info)
    if config is None:
        return None
    data = info.get("data") if isinstance(info.get("data"), Mapping) else {}
    return {"train": {k: v for k, v in sorted(config.items())
                      if k not in IGNORED_SETTINGS and ADDED_SETTINGS.get(k, ...) != v},
            **{k: info.get(k) for k in MODEL_RECORDS},
            "data": {"fingerprint": data.get("fingerprint"), "preprocessing": data.get("preprocessing")}}


def configuration_id(info: Mapping[str, Any]) -> str | None:
    """12 hex digits naming a checkpoint's configuration (:func:`configuration_fields`), or None."""
    fields = configuration_fields(info)
    return None if fields is None else options_hash(fields)


def _seed(info: Mapping[str, Any]) -> int | None:
    provenance = info.get("provenance") if isinstance(info.get("provenance"), Mapping) else {}
    seed = provenance.get("seed", (_training_config(info) or {}).get("seed"))
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def replicate_of(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"configuration": ID, "seed": SEED}`` of a loaded checkpoint's ``info``: the label it carries
    (``info["replicate"]["configuration"]``), else the id of its training configuration; None for a model
    without either (``--model``). ``seed`` is None only for a labelled checkpoint that records no seed."""
    label = info.get("replicate")
    configuration = label.get("configuration") if isinstance(label, Mapping) else None
    if not isinstance(configuration, str) or not configuration:
        configuration = configuration_id(info)
    if configuration is None:
        return None
    return {"configuration": configuration, "seed": _seed(info)}


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The configuration fields (``train.epochs``, ``optimizer``, ``data``...) in which two checkpoints' infos
    differ: what makes them different configurations, for messages."""
    fa, fb = configuration_fields(a) or {}, configuration_fields(b) or {}
    names = []
    for key in dict.fromkeys([*fa, *fb]):
        va, vb = fa.get(key), fb.get(key)
        if key == "train" and isinstance(va, Mapping) and isinstance(vb, Mapping):
            names += [f"train.{k}" for k in dict.fromkeys([*va, *vb]) if va.get(k) != vb.get(k)]
        elif options_hash({"v": va}) != options_hash({"v": vb}):
            names.append(key)
    return names
