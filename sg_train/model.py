"""EmbeddingModel: timm backbone -> pooling head -> neck (L2 -> FC, or FC -> BN) -> L2, plus
multi-scale extraction.

Descriptor path (docs/design.md §2); the ``neck`` chooses what follows the pooling::

    images -> backbone.forward_features -> [R-GeM] -> GeM | GeM+ | avg | max = pooled
    neck "l2_fc" (SuperGlobal's published evaluation, CVNet's layout; the default):
           pooled -> L2 -> FC (Linear with bias)                   = embed()  -> L2 = forward()
    neck "fc_bn" (CFCD's published stage-1 model, ``model_s1.py`` / ``model_deploy.py``):
           pooled -> FC (Linear with bias) -> BatchNorm1d          = embed()  -> L2 = forward()
    extract(): per scale s, resize to (int(h*s), int(w*s)) (bilinear, antialias; s = 1 is not
           resized), the per-scale descriptor -> Scale-GeM (or mean) over scales -> L2, where the
           per-scale descriptor is embed() for "l2_fc" (SuperGlobal averages FC outputs) and
           forward() for "fc_bn" (CFCD's ``evaler/infer.py`` L2-normalises each scale's BN output
           before averaging)

The margin loss is handed the L2 of embed() (the LightningModule calls forward()); every margin loss
normalises its input itself, so that is the same loss as on embed() (the FC output, or CFCD's BN
output).

Inputs are image tensors already normalised the way the model expects, described by the
``input_format`` ("rgb"/"bgr": channel order), ``mean`` and ``std`` attributes (in that
channel order, applied to pixels scaled to [0, 1]) and :attr:`EmbeddingModel.preprocessing`.

A model describes itself: :attr:`EmbeddingModel.config` is every constructor value in effect,
resolved (defaults, the head spec, the backbone's mean/std), as plain values with a format name
and version; :meth:`EmbeddingModel.from_config` rebuilds exactly that model, whatever today's
defaults are. Checkpoints store it (:mod:`sg_train.weights_io`). Renaming or adding a
constructor argument changes the configuration: add it to ``CONFIG_KEYS`` and, for a rename or
a changed meaning, raise ``MODEL_CONFIG_VERSION`` and teach :func:`model_config_arguments` the
older version.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Literal, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import create_backbone, load_backbone_weights
from .errors import OptionError
from .options import check_option_types
from .pooling.head import PoolingHead, parse_head_spec
from .relu_plus import RELU_PLUS_ALPHA, apply_relu_plus
from .weights_io import WeightsFileError

__all__ = [
    "CONFIG_KEYS",
    "EmbeddingModel",
    "MAX_SCALE",
    "MIN_SCALE",
    "MODEL_CONFIG_FORMAT",
    "MODEL_CONFIG_VERSION",
    "ModelConfigError",
    "config_differences",
    "model_config_arguments",
    "check_scales",
    "resize_for_scale",
    "scaled_size",
]

INPUT_FORMATS = ("rgb", "bgr")
#: the range of an extraction scale (:func:`check_scales` says why)
MIN_SCALE, MAX_SCALE = 1 / 16, 4.0
MODEL_CONFIG_FORMAT = "sg-train/embedding-model"
#: 2: ``neck`` and ``gem_p_learnable`` added (version 1 configurations read as "l2_fc" and True)
MODEL_CONFIG_VERSION = 2
#: what follows the pooling: "l2_fc" (L2 -> FC; SuperGlobal/CVNet) or "fc_bn" (FC -> BatchNorm1d; CFCD)
NECKS = ("l2_fc", "fc_bn")
#: the constructor arguments a configuration holds: all of them but ``pretrained_weights`` (the
#: weights travel beside the configuration, not as a file name)
CONFIG_KEYS = (
    "backbone", "head", "embedding_dim", "neck", "relu_plus", "relu_plus_alpha", "gem_p", "gem_p_learnable",
    "gemp_p", "rgem_p", "rgem_kernel", "scales", "sgem", "sgem_p", "input_format", "mean", "std",
)
#: keys each version added, with the value that gives the model an older configuration described
#: (the behaviour before the key existed)
_ADDED_KEYS: dict[int, dict[str, Any]] = {2: {"neck": "l2_fc", "gem_p_learnable": True}}


class ModelConfigError(WeightsFileError):
    """A stored model configuration this version cannot rebuild: another format, a newer version,
    or keys missing or unknown."""


def model_config_arguments(config: Mapping[str, Any], what: str = "model configuration") -> dict[str, Any]:
    """The :class:`EmbeddingModel` constructor arguments of ``config`` (an :attr:`EmbeddingModel.config`).

    A configuration of an older version is read as the model it described: the keys added since
    (``_ADDED_KEYS``) take the value that reproduces the behaviour of its time (version 1: ``neck``
    "l2_fc", ``gem_p_learnable`` True). Raises :class:`ModelConfigError` naming ``what`` for a value
    that is not a mapping, another ``format``, a ``version`` newer than :data:`MODEL_CONFIG_VERSION`
    (written by a newer sg-train) or not a positive integer, and for keys missing or unknown to its
    version (a version-1 configuration holding ``neck`` is as damaged as one lacking ``head``). The
    values themselves are checked by the constructor.
    """
    if not isinstance(config, Mapping):
        raise ModelConfigError(f"{what}: the model configuration is a {type(config).__name__}, not a mapping")
    if config.get("format") != MODEL_CONFIG_FORMAT:
        raise ModelConfigError(
            f"{what}: not an sg-train model configuration (format {config.get('format')!r}, expected "
            f"{MODEL_CONFIG_FORMAT!r})"
        )
    version = config.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelConfigError(f"{what}: model configuration version must be a positive integer, got {version!r}")
    if version > MODEL_CONFIG_VERSION:
        raise ModelConfigError(
            f"{what}: the model configuration has version {version}, written by a newer sg-train; this one "
            f"reads up to version {MODEL_CONFIG_VERSION}: upgrade sg-train to load it"
        )
    arguments = {key: value for key, value in config.items() if key not in ("format", "version")}
    added_since = {key: value for v in range(version + 1, MODEL_CONFIG_VERSION + 1)
                   for key, value in _ADDED_KEYS.get(v, {}).items()}
    keys = [key for key in CONFIG_KEYS if key not in added_since]  # what a configuration of this version holds
    missing = [key for key in keys if key not in arguments]
    unknown = sorted(set(arguments) - set(keys))
    if missing or unknown:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
        raise ModelConfigError(
            f"{what}: model configuration version {version} is damaged or edited: {'; '.join(problems)} "
            f"(it holds exactly {keys})"
        )
    return {key: arguments[key] if key in arguments else added_since[key] for key in CONFIG_KEYS}


def _unused_keys(arguments: Mapping[str, Any]) -> set[str]:
    """Configuration keys whose values do not change a model with these ``arguments``: options of
    head components it does not have, and the ReLU+ floor without ReLU+. A pooling added with
    :func:`~sg_train.pooling.head.register_pooling` may read any head option: all count as used."""
    spec = parse_head_spec(arguments["head"])
    unused = set()
    if spec.pooling in ("gemp", "avg", "max"):
        unused.update(("gem_p", "gem_p_learnable"))
    if spec.pooling in ("gem", "avg", "max"):
        unused.add("gemp_p")
    if not spec.regional and spec.pooling in ("gem", "gemp", "avg", "max"):
        unused.update(("rgem_p", "rgem_kernel"))
    if not spec.scale_gem:
        unused.update(("sgem", "sgem_p"))
    elif arguments["sgem"] != "finite":
        unused.add("sgem_p")
    if not arguments["relu_plus"]:
        unused.add("relu_plus_alpha")
    return unused


def config_differences(
    stored: Mapping[str, Any], configured: Mapping[str, Any], *, ignore: frozenset[str] = frozenset()
) -> list[str]:
    """``"key: <stored> stored, <configured> configured"`` for every value that differs between two
    sets of constructor arguments (:func:`model_config_arguments`), in :data:`CONFIG_KEYS` order.

    Skipped: keys in ``ignore`` and keys that change neither model (see ``_unused_keys``). One
    exception: ``gem_p`` in ``ignore`` (an initial value the loaded weights replace) is compared when
    either side's GeM p is fixed (``gem_p_learnable`` false): a fixed p is no weight, nothing loaded
    replaces it.
    """
    unused = _unused_keys(stored) & _unused_keys(configured)
    if not (stored["gem_p_learnable"] and configured["gem_p_learnable"]):
        ignore = ignore - {"gem_p"}
    return [
        f"{key}: {stored[key]!r} stored, {configured[key]!r} configured"
        for key in CONFIG_KEYS
        if key not in ignore and key not in unused and stored[key] != configured[key]
    ]


def check_scales(scales: Sequence[float], what: str = "scales") -> tuple[float, ...]:
    """``scales`` as a tuple of floats, in order; :class:`OptionError` naming ``what`` (the option
    the user set, e.g. ``--scales``) for an empty list, a value outside [:data:`MIN_SCALE`,
    :data:`MAX_SCALE`] (nan, inf and non-positive values among them), or a scale given twice (it
    would be extracted twice and weigh double in the mean).

    The range: below 1/16 an image shrinks to a few pixels (a 1024-px side to less than 64 px, two
    cells of a ResNet's feature map), so its descriptor says nothing of it; above 4 an image is
    extracted at more than 4 times its sides: more than 16 times its pixels and the memory of its
    feature maps, which grows with the square of the scale (scale 1000 asked for 393 GB at once)."""
    try:
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be a list of positive numbers, got {scales!r}") from None
    if not values:
        raise OptionError(f"{what} is empty; give at least one scale (e.g. 0.7071 1 1.4142)")
    bad = [s for s in values if not MIN_SCALE <= s <= MAX_SCALE]  # False for nan
    if bad:
        raise OptionError(f"{what} {list(values)}: each must be a number from {MIN_SCALE:g} (1/16) to {MAX_SCALE:g}, "
                          f"not {', '.join(map(str, bad))} (e.g. 0.7071 1 1.4142)")
    repeated = sorted({s for s in values if values.count(s) > 1})
    if repeated:
        raise OptionError(f"{what} {list(values)} name {', '.join(map(str, repeated))} more than once; give each "
                          "scale once")
    return values


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(int(height·scale), int(width·scale))``, each at least 1 pixel (SuperGlobal's sizes: with its
    literal 1.4142 a 338-px side becomes 477, with exact √2 478)."""
    return max(1, int(height * scale)), max(1, int(width * scale))


def resize_for_scale(images: Tensor, scale: float, *, mode: str = "bilinear", antialias: bool = True) -> Tensor:
    """Resize an NCHW batch to ``(int(h*s), int(w*s))`` (``F.interpolate`` ``mode``,
    ``align_corners=False``, ``antialias``); s = 1: unchanged.

    A side that would round to 0 is kept at 1 pixel. The evaluation protocols choose ``mode`` and
    ``antialias`` (:meth:`sg_train.eval_protocols.EvalProtocol.resize`).
    """
    if scale <= 0:
        raise OptionError(f"scales must be > 0, got {scale}")
    if scale == 1.0:
        return images
    size = scaled_size(int(images.shape[-2]), int(images.shape[-1]), scale)
    return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=antialias)


class EmbeddingModel(nn.Module):
    """Global-descriptor model for retrieval training and extraction.

    Args:
        backbone: any timm model name whose ``forward_features`` gives an NCHW map.
        head: pooling head spec, "+"-joined: ``[rgem+](gem|gemp|avg|max)[+sgem]``
            (see :mod:`sg_train.pooling.head`), e.g. "gem", "rgem+gemp+sgem".
        embedding_dim: output size of the FC layer (the descriptor size).
        neck: what follows the pooling. "l2_fc" (default): L2 -> FC (with bias), SuperGlobal's
            evaluation path and CVNet's layout. "fc_bn": FC (with bias) -> BatchNorm1d, no L2
            before the FC: CFCD's stage-1 model (its ``model_s1.py``); the BN output, L2-normalised,
            is the descriptor. In training mode BatchNorm1d needs at least 2 images per batch (per
            device): a batch of 1 raises :class:`~sg_train.errors.OptionError`. Extraction runs BN
            on its running statistics (call ``eval()``). CVNet's weight layout has no BN: such a
            model cannot be written as or read from CVNet weights.
        pretrained_weights: local weights file for the backbone (timm key layout), checked
            strictly (see :func:`sg_train.backbone.load_backbone_weights`); None: random init.
            Never downloads.
        relu_plus: replace ReLUs of a timm ResNet by ReLU+ (SuperGlobal placement; error for
            other backbones).
        relu_plus_alpha: the ReLU+ floor (0.014).
        gem_p: initial p of the learnable GeM ("gem"), or its fixed p.
        gem_p_learnable: True (default): GeM's p is a parameter, trained. False: p stays ``gem_p``,
            a constant (no parameter, no state-dict key; CFCD's GeM, p = 3).
        gemp_p: fixed p of GeM+ ("gemp").
        rgem_p, rgem_kernel: p and window of Regional-GeM ("rgem").
        scales: default scales of :meth:`extract`.
        sgem: "max" (max over L2-normalised per-scale descriptors) or "finite"; used when
            the head spec has "sgem". Without "sgem", scales are averaged.
        sgem_p: p of the finite Scale-GeM.
        input_format: channel order the model expects, "rgb" or "bgr".
        mean, std: per-channel normalisation, in ``input_format`` order, of pixels in [0, 1].
            Default: the timm model's ``pretrained_cfg`` mean/std (RGB; reversed for "bgr").

    Raises :class:`~sg_train.errors.OptionError` (a ValueError) for an argument of the wrong type
    (e.g. ``gem_p="3"`` from a YAML ``model_options``), naming it and the value to write
    (:func:`check_option_types`), and for values out of range.

    Attributes: ``config`` (the configuration that rebuilds this model, see :meth:`from_config`),
    ``scales``, ``input_format``, ``mean``, ``std``, ``embedding_dim``, ``feature_dim``,
    ``backbone_name``, ``relu_plus``, ``neck``; modules ``backbone``, ``head``, ``fc`` and ``bn``
    (BatchNorm1d for "fc_bn", else None).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        head: str = "gem",
        embedding_dim: int = 2048,
        *,
        neck: Literal["l2_fc", "fc_bn"] = "l2_fc",
        pretrained_weights: str | None = None,
        relu_plus: bool = False,
        relu_plus_alpha: float = RELU_PLUS_ALPHA,
        gem_p: float = 3.0,
        gem_p_learnable: bool = True,
        gemp_p: float = 4.6,
        rgem_p: float = 2.5,
        rgem_kernel: int = 5,
        scales: Sequence[float] = (1.0,),
        sgem: Literal["max", "finite"] = "max",
        sgem_p: float = 10.0,
        input_format: Literal["rgb", "bgr"] = "rgb",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        options = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_option_types("model", EmbeddingModel.__init__, options)
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise OptionError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        if int(embedding_dim) < 1:
            raise OptionError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if neck not in NECKS:
            raise OptionError(f"neck must be one of {NECKS}, got {neck!r}")
        self.scales = check_scales(scales, "model scales")
        # Head first: a bad spec fails before the (slower) backbone is built.
        self.head = PoolingHead(
            head, gem_p=gem_p, gem_p_learnable=gem_p_learnable, gemp_p=gemp_p, rgem_p=rgem_p,
            rgem_kernel=rgem_kernel, sgem=sgem, sgem_p=sgem_p,
        )
        self.backbone_name = backbone
        self.backbone = create_backbone(backbone)
        if pretrained_weights is not None:
            load_backbone_weights(self.backbone, pretrained_weights, name=backbone)
        self.relu_plus = bool(relu_plus)
        if self.relu_plus:
            apply_relu_plus(self.backbone, relu_plus_alpha)
        self.feature_dim = int(self.backbone.num_features)
        self.embedding_dim = int(embedding_dim)
        self.neck = neck
        self.fc = nn.Linear(self.feature_dim, self.embedding_dim, bias=True)
        # CFCD's BatchNorm1d (torch defaults: eps 1e-5, momentum 0.1, affine, as its model_s1.py)
        self.bn = nn.BatchNorm1d(self.embedding_dim) if neck == "fc_bn" else None

        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        in_chans = int(cfg.get("input_size", (3,))[0])
        self.input_format = input_format
        self.mean = self._check_stats("mean", mean, cfg.get("mean", (0.485, 0.456, 0.406)), in_chans)
        self.std = self._check_stats("std", std, cfg.get("std", (0.229, 0.224, 0.225)), in_chans)
        if any(s <= 0 for s in self.std):
            raise OptionError(f"std must be > 0, got {self.std}")
        self._config = {
            "backbone": backbone,
            "head": str(self.head.spec),
            "embedding_dim": self.embedding_dim,
            "neck": self.neck,
            "relu_plus": self.relu_plus,
            "relu_plus_alpha": float(relu_plus_alpha),
            "gem_p": float(gem_p),
            "gem_p_learnable": bool(gem_p_learnable),
            "gemp_p": float(gemp_p),
            "rgem_p": float(rgem_p),
            "rgem_kernel": int(rgem_kernel),
            "scales": list(self.scales),
            "sgem": sgem,
            "sgem_p": float(sgem_p),
            "input_format": self.input_format,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    # -- configuration ----------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Everything that rebuilds this model but its weights, as plain values (a new dict each time).

        ``{"format": "sg-train/embedding-model", "version": 2, **arguments}`` where ``arguments``
        holds every :data:`CONFIG_KEYS` constructor value in effect, resolved: ``head`` normalised
        (e.g. "rgem+gemp+sgem"), ``scales``/``mean``/``std`` as lists of floats (``mean``/``std``
        in ``input_format`` order, the backbone's defaults filled in), options of components the
        head does not use included as given. ``pretrained_weights`` is not part of it.
        """
        return {"format": MODEL_CONFIG_FORMAT, "version": MODEL_CONFIG_VERSION, **copy.deepcopy(self._config)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EmbeddingModel:
        """The model ``config`` (an :attr:`config`) describes, with freshly initialised weights.

        Today's constructor defaults play no part: every value comes from ``config``. Raises
        :class:`ModelConfigError` for a configuration this version cannot read (another format, a
        newer version, missing or unknown keys; see :func:`model_config_arguments`) and
        :class:`~sg_train.errors.OptionError` for a value the constructor refuses.
        """
        return cls(**model_config_arguments(config))

    # -- construction helpers -------------------------------------------------------------
    def _check_stats(
        self, what: str, given: Sequence[float] | None, default_rgb: Sequence[float], channels: int
    ) -> tuple[float, ...]:
        if given is None:
            values = tuple(float(v) for v in default_rgb)
            return values[::-1] if self.input_format == "bgr" else values
        values = tuple(float(v) for v in given)
        if len(values) != channels:
            raise OptionError(f"{what} needs {channels} values (one per input channel), got {values}")
        return values

    # -- descriptors ------------------------------------------------------------------------
    @property
    def preprocessing(self) -> dict[str, object]:
        """How inputs must be prepared: ``(pixels / 255 - mean) / std`` in ``input_format`` order."""
        return {"input_format": self.input_format, "scale": 1.0 / 255.0, "mean": self.mean, "std": self.std}

    def pooled(self, images: Tensor) -> Tensor:
        """Pooled backbone features ``(B, feature_dim)``, before any normalisation."""
        return self.head(self.backbone.forward_features(images))

    def embed(self, images: Tensor) -> Tensor:
        """The neck's output ``(B, embedding_dim)``, not normalised: the FC output of the L2-normalised
        pooled features ("l2_fc"), or the BatchNorm1d output of the FC of the pooled features ("fc_bn",
        BN computed in the BN weights' dtype, float32 under autocast).

        Raises :class:`~sg_train.errors.OptionError` for a training-mode "fc_bn" batch of one image
        (BatchNorm1d has no batch statistics of one sample; torch's own error names no cause).
        """
        return self._neck(self.pooled(images))

    def _neck(self, pooled: Tensor) -> Tensor:
        """:meth:`embed` from the pooled features (float32 from the head)."""
        if self.bn is None:
            pooled = F.normalize(pooled, p=2, dim=-1)
        out = self.fc(pooled.to(self.fc.weight.dtype))
        if self.bn is None:
            return out
        if self.bn.training and out.shape[0] == 1:
            raise OptionError(
                "the fc_bn neck (model.model_options.neck) computes BatchNorm1d statistics over the batch, so a "
                "training batch needs at least 2 images per device, got 1: set data.batch_size >= 2 per device (a "
                "batch can also shrink to one when its other images are unreadable), or extract in eval() mode"
            )
        return self.bn(out.to(self.bn.weight.dtype))

    def forward(self, images: Tensor) -> Tensor:
        """L2-normalised descriptors ``(B, embedding_dim)`` at the input's own scale."""
        return F.normalize(self.embed(images), p=2, dim=-1)

    def forward_with_feature_map(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(descriptors, feature_map)`` from one backbone pass: :meth:`forward`'s L2-normalised
        ``(B, embedding_dim)`` descriptors and the backbone's last feature map ``(B, C, h, w)`` they
        were pooled from (CFCD stage 2 takes its local descriptors from it). Raises as :meth:`embed`."""
        feature_map = self.backbone.forward_features(images)
        return F.normalize(self._neck(self.head(feature_map)), p=2, dim=-1), feature_map

    def scale_descriptor(self, images: Tensor) -> Tensor:
        """The per-scale descriptor :meth:`extract` aggregates: :meth:`embed` for "l2_fc" (SuperGlobal
        aggregates FC outputs), :meth:`forward` for "fc_bn" (CFCD L2-normalises each scale's BN output)."""
        return self.embed(images) if self.bn is None else self.forward(images)

    def extract(
        self, images: Tensor, scales: Sequence[float] | None = None, *, resize: Callable[[Tensor, float], Tensor] = resize_for_scale
    ) -> Tensor:
        """Multi-scale descriptors ``(B, embedding_dim)``, L2-normalised.

        For each scale the batch is resized (``resize(images, scale)``: :func:`resize_for_scale`, or
        an evaluation protocol's :meth:`~sg_train.eval_protocols.EvalProtocol.resize`) and embedded; the
        per-scale descriptors (:meth:`scale_descriptor`: FC outputs for "l2_fc", L2-normalised BN outputs
        for "fc_bn") are aggregated by the head (Scale-GeM max / finite, or mean without "sgem") and
        normalised. With one scale of 1 this is :meth:`forward`. Runs in the module's current mode and
        grad state: call ``eval()`` (BatchNorm on its running statistics) and wrap in
        ``torch.no_grad()`` for inference.
        """
        scales = self.scales if scales is None else check_scales(scales)
        per_scale = [self.scale_descriptor(resize(images, s)) for s in scales]
        return F.normalize(self.head.aggregate_scales(per_scale), p=2, dim=-1)

    # -- optimiser support ------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """``{"backbone": [(name, param), ...], "head": [...]}`` with names as in ``named_parameters()``
        (the head: GeM's learnable p, the FC and the neck's BatchNorm1d)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"backbone": [], "head": []}
        for name, param in self.named_parameters():
            groups["backbone" if name.startswith("backbone.") else "head"].append((name, param))
        return groups
