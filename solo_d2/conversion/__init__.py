"""Convert published SOLO checkpoints and ImageNet ResNet weights to solo_d2 parameter names.

One module per source layout, each a :class:`~.core.Layout` registered with
:func:`~.core.register_layout` (adding a layout is adding a module and importing it here):

- :mod:`.mmdet`: mmdetection 2.x / 3.x ``SOLO`` and ``SOLOv2`` detectors (``mask_head.*``);
- :mod:`.official`: the official SOLO repository (github.com/WXinlong/SOLO, ``bbox_head.*``);
- :mod:`.adelaidet`: AdelaiDet's SOLOv2 (github.com/aim-uofa/AdelaiDet, ``ins_head.*``,
  ``mask_head.*``; caffe-style);
- :mod:`.torchvision`: torchvision ResNet ImageNet state dicts (backbone only);
- :mod:`.detectron2_imagenet`: Detectron2's model-zoo ImageNet ResNet ``.pkl`` files (MSRA,
  caffe-style; backbone only), read with a restricted unpickler.

The shared core: :mod:`.core` (errors, :class:`ConvertedCheckpoint`, reading files safely, the
layout registry, :func:`convert_state_dict`), :mod:`.describe` (head type and sizes read from the
converted weights, completeness), :mod:`.configs` (config choice) and :mod:`.check` (checking
against the model a config builds).

Head types (from the mask output layers): ``"SOLO"`` (one S^2-channel conv per level),
``"DecoupledSOLO"`` (separate X and Y towers, one coordinate channel each),
``"DecoupledSOLOLight"`` (one tower, X and Y output convs) and ``"SOLOv2"`` (a kernel conv and
a mask feature branch; its weights do not give the grid numbers, which come from the config).
Deformable convs (mmcv / mmdet 1.x ``DeformConvPack`` and ``ModulatedDeformConvPack``:
``conv.weight`` + ``conv.conv_offset.*``) map to :class:`solo_d2.modeling.layers.DeformConv`;
the offset conv's channels tell DCN v1 (2 k^2) from modulated DCN v2 (3 k^2, the published
SOLOv2 DCN models), whose channel order (offsets, then modulation logits) ``DeformConv`` keeps.
Deformable tower convs set ``MODEL.SOLO.NUM_DEFORMABLE_CONVS`` / ``DEFORMABLE_MODULATED``,
deformable SOLOv2 mask feature convs ``MODEL.SOLO.MASK_FEATURE_DEFORMABLE``; deformable backbone
convs (``layer{2..4}.{b}.conv2.conv_offset.*``) select ``build_solo_resnet_fpn_backbone`` with
``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` / ``DEFORM_MODULATED``. (The key names and shapes are
checked; the numerical equality of mmcv's and torchvision's deformable conv cannot be checked
here: mmcv-lite has no compiled ops.)

Checkpoint files are read with ``torch.load(weights_only=True)``, ``.pkl`` files with an unpickler
that rebuilds numpy arrays and plain containers only; one that holds other Python objects
(mmengine's checkpoints keep a ``message_hub`` of ``HistoryBuffer`` objects in ``meta``) is only
unpickled when the caller allows it (``--unsafe-load``).

Each layout has a backbone style (``"pytorch"``: torchvision's ResNets; ``"caffe"``: Detectron2's
MSRA ResNets) with the same tensor shapes: the config is chosen from the layout, and a config of
the other style is refused (:func:`~.configs.check_input_style`).

solo_d2 names (Detectron2's ResNet/FPN, the heads of :mod:`solo_d2.modeling.heads`,
``docs/head_parameter_names.md``):
``backbone.bottom_up.stem.conv1[.norm]``, ``backbone.bottom_up.res{2..5}.{b}.conv{k}[.norm]``,
``.shortcut[.norm]`` (FrozenBN buffers ``weight, bias, running_mean, running_var``),
``backbone.fpn_lateral{2..5}``, ``backbone.fpn_output{2..5}``, ``head.cate_tower.{i}``
(``[conv, norm, ReLU]`` per conv, or ``[conv, ReLU]`` without norm), ``head.cate_pred``,
``head.mask_tower`` / ``head.mask_tower_x`` / ``head.mask_tower_y``, ``head.mask_preds.{l}`` or
``head.mask_preds.{l}.x`` / ``.y``; SOLOv2: ``head.kernel_tower.{i}``, ``head.kernel_pred``,
``head.mask_feature.levels.{i}.{j}[.norm]``, ``head.mask_feature.pred[.norm]``.

Every source key is either mapped or named in an error; nothing is dropped silently except
BatchNorm's ``num_batches_tracked`` counters, the ImageNet classifiers (torchvision's ``fc``,
Caffe2's ``fc1000``), mmengine's (parameter-free) ``data_preprocessor`` entries and Caffe2's
round-off stem conv bias.
"""
# Layouts, in the order they are tried (registration order; AdelaiDet's before mmdetection's,
# whose 'mask_head.*' prefix AdelaiDet's checkpoints have too).
from . import adelaidet  # noqa: F401,I001  (register the layouts)
from . import torchvision, mmdet, official, detectron2_imagenet  # noqa: F401,I001
from .check import check_against_model
from .configs import (INPUT_STYLES, check_input_style, config_file_for, config_overrides,
                      converted_config)
from .core import (
    AUTHOR,
    ConversionError,
    ConvertedCheckpoint,
    Layout,
    convert_state_dict,
    detect_layout,
    extract_state_dict,
    NumpyOnlyUnpickler,
    get_layout,
    load_numpy_pickle,
    load_source_checkpoint,
    register_layout,
)

__all__ = [
    "ConversionError",
    "ConvertedCheckpoint",
    "Layout",
    "register_layout",
    "get_layout",
    "load_source_checkpoint",
    "extract_state_dict",
    "detect_layout",
    "convert_state_dict",
    "converted_config",
    "config_overrides",
    "config_file_for",
    "check_against_model",
    "check_input_style",
    "INPUT_STYLES",
    "NumpyOnlyUnpickler",
    "load_numpy_pickle",
    "AUTHOR",
]
