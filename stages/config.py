"""Every knob of every stage, with its default, in one place.

Each dataclass is one stage's significant parameters: they enter the stage's cache key, so changing any
of them recomputes that stage and what follows it. The Luigi layer turns each field into a task
parameter, so a value can come from a ``[TrainCAM]`` section of ``luigi.cfg`` or from ``--TrainCAM-lr``.

Defaults are what the embedded ``demo`` dataset uses, so a bare ``luigi --module pipeline FullWSSS``
runs anywhere. Where the reference code (IRN, ``jiwoon-ahn/irn``) differs, its value is in the comment,
and ``configs/voc.cfg`` sets it.

Operational settings that do not change results (work directory, device, worker counts) live in
:class:`RuntimeConfig` and never enter a key.

This module is a leaf: it imports nothing from the project, and :func:`validate` checks values only. Names that
must match a registry (backbones, methods, CRF presets) are checked by the pipeline, once per task
(``pipeline.checks``). Because the knobs enter a key by value, this module's code is not part of any key
(``pipeline.hashing.VALUE_MODULES``): adding a knob to one stage changes that stage's key through its parameters
and leaves every other key alone. A method's own knobs carry its name as a prefix (``gcn_*``, ``a2gnn_*``), and
only the chosen method's enter the key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import math
import tokenize
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RuntimeConfig:
    """``[wsss]``: where and how to run; never part of a cache key."""

    work_dir: str = "work"        # where stage directories go: <work_dir>/<Stage>/<key>/
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    loader_workers: int = 1       # DataLoader worker processes
    torch_threads: int = 0        # 0 = a share of the cores: cores // tasks computing on this host (re-read)
    train_processes: int = 1      # TrainCAM: DDP ranks under torchrun (1 = train in this process)
    gpus: str = ""                # devices GPU tasks share on this host: "" = CUDA_VISIBLE_DEVICES or nvidia-smi
    gpu_lock_dir: str = ""        # per-host lock files (pipeline.devices); "" = <tmp>/wsss-gpu-locks-<user>
    gpu_wait_s: float = 3600.0    # how long a task waits for free devices before failing
    submit_stages: str = ""       # task families run as submitit jobs, e.g. TrainCAM,MakeCAMShard ([submitit])
    crf_backend: str = "auto"     # dense CRF: pydensecrf | torch | auto (torch on CUDA, else pydensecrf)
    cut_processes: int = 1        # TrainSeedNet graphcut: worker processes for the per-image s-t cuts


@dataclass(frozen=True)
class DatasetConfig:
    """``[PrepareDataset]``: which images, labels and splits."""

    kind: str = "synthetic"       # synthetic | voc (any dataset in VOC layout)
    profile: str = "demo"         # synthetic only: tiny | demo | double (2x the demo's side) | large
    seed: int = 0                 # synthetic only
    root: str = ""                # voc: dataset root holding JPEGImages/, Annotations/, ...
    label_space: str = ""         # JSON/YAML class list; "" = the 21 VOC classes (voc) or the embedded one
    train_list: str = "ImageSets/Segmentation/train.txt"   # VOC+SBD: ImageSets/Segmentation/train_aug.txt
    eval_list: str = "ImageSets/Segmentation/train.txt"    # seeds/pseudo labels are scored on train
    val_list: str = "ImageSets/Segmentation/val.txt"  # the segmenter's val split (DeepLab and parts are scored on it)
    seg_dir: str = "SegmentationClass"        # VOC+SBD: SegmentationClassAug (labels-from-mask, training GT)
    eval_seg_dir: str = "SegmentationClass"   # GT used for every evaluation
    image_labels_from: str = "xml"            # xml | mask
    on_bad_input: str = "error"               # error | quarantine (skip and list bad images in the report)
    # voc: how scheduling sees edits to the data (the key's dataset fingerprint): stat = path, size, mtime and inode
    # of every file (one stat each); content = their bytes (slow; for filesystems with unreliable mtimes)
    fingerprint_mode: str = "stat"
    # Larger images are refused (or quarantined) from their header, before decoding: memory grows with the pixels
    # (a 12-megapixel val image took 7.5 GiB). 4 MP is 16x VOC's largest (500x500); 0 = no limit.
    max_pixels: int = 4_000_000


SUPERVISIONS = ("image", "point", "scribble", "box")   # ExtractSeeds.supervision (stages.seeds.supervision)


# ``pretrained`` takes a weights path, or this value for the PretrainBackbone stage's synthetic weights.
SYNTHETIC_PRETRAINING = "synthetic"


@dataclass(frozen=True)
class PretrainBackboneConfig:
    """``[PretrainBackbone]``: our stand-in for ImageNet weights when none are given (CPU demo).

    Classifies one-object images rendered on the fly (any scene, no co-occurrence) with a linear head on
    global-average-pooled features; the backbone's weights then initialise the stages whose ``pretrained``
    is ``synthetic``, as ImageNet weights initialise IRN's and PSA's networks.
    """

    backbone: str = "resnet_mini"             # must equal the backbone of every stage that uses it
    steps: int = 1500                         # SGD steps, one batch of fresh renders each
    batch_size: int = 32                      # renders per step
    image_size: int = 80                      # side of each square render, in pixels
    lr: float = 0.1                           # SGD, Nesterov momentum 0.9, poly decay per step
    weight_decay: float = 1e-4                # L2 penalty on the weights (SGD weight_decay)
    poly_power: float = 0.9                   # learning rate x (1 - progress)^poly_power
    eval_images: int = 512                    # held-out renders for the accuracy in the metrics
    seed: int = 0                             # seeds the initial weights and the rendered images


@dataclass(frozen=True)
class TrainCAMConfig:
    """``[TrainCAM]``: the classification network whose CAMs seed everything."""

    cam_method: str = "cam"                   # registry: stages.cam.CAM_METHODS (cam | psa | seam)
    backbone: str = "resnet_mini"             # IRN: resnet50
    pretrained: str = ""                      # ImageNet weights (.pth, torchvision layout) | synthetic
    strides: tuple[int, ...] = (1, 2, 1, 1)   # per ResNet stage; IRN: (1, 2, 2, 1), output stride 16
    freeze_bn: bool = False                   # IRN: true (BN always uses running statistics)
    frozen_stages: int = 0                    # IRN: 2 (stem, layer1, layer2 never update)
    num_epochs: int = 30                      # IRN: 5
    batch_size: int = 16                      # IRN: 16
    lr: float = 0.05                          # IRN: 0.1 (backbone)
    head_lr_mult: float = 10.0                # IRN: 10 (classifier at 1.0)
    weight_decay: float = 1e-4                # IRN: 1e-4
    optimizer: str = "sgd"                    # sgd (IRN) | adamw (for backbones trained from scratch)
    momentum: float = 0.9                     # SGD momentum
    momentum_quirk: bool = False              # IRN/PSA pass weight decay into SGD's momentum slot
    poly_power: float = 0.9                   # learning rate x (1 - progress)^poly_power
    resize_long: tuple[int, int] = (80, 160)  # IRN: (320, 640), drawn uniformly per image; auto: x median long side
    crop_size: int = 112                      # IRN: 512, zero-padded when the image is smaller; auto: image share
    color_jitter: float = 0.0                 # PSA/SEAM: 0.3 (brightness/contrast/saturation; hue = jitter/3)
    # SEAM only (cam_method = seam), values of YudeWang/SEAM train_SEAM.py:
    seam_rescale: float = 0.3                 # scale of the Siamese branch's input
    seam_ecr_top: float = 0.2                 # ECR keeps the hardest 20% of entries
    seam_min_pool: float = 0.25               # min-pool loss on the weakest 25% of pixels
    # The run's seed: initial weights, the order of the images and their augmentation
    seed: int = 0


@dataclass(frozen=True)
class MakeCAMConfig:
    """``[MakeCAM]``: multi-scale CAM inference."""

    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)   # image rescales whose CAMs are summed (IRN)
    flip: bool = True                         # also predict the horizontally flipped image and add it back
    shard_size: int = 256                     # images per shard file (one task each)


@dataclass(frozen=True)
class EvalCAMConfig:
    """``[EvalCAM]``: CAMs scored against GT on the eval list."""

    bg_threshold: float = 0.15                # background where every CAM is below it (IRN cam_eval_thres)
    sweep: tuple[float, float, float] = (0.0, 0.6, 0.01)   # start, stop (inclusive), step
    pred_ignore: str = "background"           # predicted 255: background (IRN) | exclude (WSGCN)


@dataclass(frozen=True)
class ExtractSeedsConfig:
    """``[ExtractSeeds]``: confident seeds (fg / bg / 255 = ignore) from full-resolution CAMs."""

    seed_method: str = "irn"                  # registry: stages.seeds.rules.SEED_METHODS (irn | psa | a2gnn)
    # irn: constant background planes, each followed by the label CRF:
    fg_threshold: float = 0.30                # IRN conf_fg_thres
    bg_threshold: float = 0.05                # IRN conf_bg_thres
    label_crf_gt_prob: float = 0.7            # label CRF: confidence in each hard label (its unary)
    label_crf_bilateral: tuple[float, float, float] = (50.0, 5.0, 10.0)   # sxy, srgb, compat
    # psa / a2gnn: background (1 - max CAM)^alpha, CRF on the unnormalised scores:
    alpha_low: float = 4.0                    # "la": confident foreground
    alpha_high: float = 32.0                  # "ha": confident background; SEAM and A2GNN: 24
    score_crf_bilateral: tuple[float, float, float] = (80.0, 13.0, 10.0)   # sxy, srgb, compat
    # a2gnn: top 40% of each class inside its argmax region, confident background and CRF
    top_fraction: float = 0.4
    bg_confidence: float = 0.8                # confident background: (1 - max CAM)^ha above this
    crf_confidence: float = 0.8               # kept where the CRF's max of [ha bg, la classes] reaches this
    crf_gaussian: tuple[float, float] = (3.0, 3.0)                       # every CRF here: Gaussian sxy, compat
    crf_iterations: int = 10                  # mean-field iterations of every CRF here
    # Extra supervision merged into the CAM seeds (stages.seeds.supervision; A2GNN's SEAM_{Point,Scribble,Box}):
    # image (CAM seeds as they are) | point | scribble | box
    supervision: str = "image"
    superpixels: int = 300                    # SLIC segments per image (point superpixel stamps, scribble growth)
    superpixel_compactness: float = 10.0      # SLIC: Lab distance worth one grid step of distance
    superpixel_iterations: int = 10           # SLIC assignment/update rounds
    point_stamp: str = "superpixel"           # each click labels its superpixel | a disk of point_radius
    point_radius: int = 3                     # disk radius in pixels (point_stamp = disk)
    # scribble: which map becomes labels/: grown (scribbles grown over superpixels, A2GNN's GNN supervision) |
    # affinity (CAM seeds with the scribbles on top); the other one is written to scribble_<other>/<id>.png
    scribble_label: str = "grown"
    box_grabcut_iterations: int = 3           # cv2.grabCut rounds per box
    box_cam_threshold: float = 0.5            # in-box foreground needs CAM seed = c or CAM_c >= this (and GrabCut)
    box_ring: float = 0.05                    # ignore ring along each box edge, fraction of its shorter side
    box_inside_background: bool = True        # in-box background where GrabCut says bg and the CAM agrees
    box_bg_cam: float = 0.1                   # "the CAM agrees": CAM seed = bg, or every CAM plane below this
    shard_size: int = 256                     # images per shard file (one task each)


@dataclass(frozen=True)
class TrainAffinityConfig:
    """``[TrainAffinity]``: the inter-pixel relation network trained on the seeds."""

    affinity_method: str = "irnet"            # registry: stages.affinity.AFFINITY_METHODS (irnet | affinitynet | a2gnn)
    backbone: str = "resnet_mini"             # IRN: resnet50; PSA/SEAM: resnet38
    pretrained: str = ""                      # ImageNet weights (.pth); IRN/PSA start from these | synthetic
    init_from_cam: bool = True                # no ImageNet weights: start from the CAM net's backbone
    freeze_backbone: bool = True              # IRN: the backbone never trains; PSA: it does (frozen BN)
    # affinitynet, a2gnn: the stem and first residual stage never train (PSA, SEAM, A2GNN freeze ResNet-38's conv1a,
    # b2, b2_1, b2_2; on a ResNet conv1 + layer1)
    frozen_early_blocks: bool = True
    strides: tuple[int, ...] = (1, 2, 1, 1)   # ResNet backbones; IRN: (1, 2, 2, 1)
    radius: int = 10                          # training pair radius: IRN 10, PSA/SEAM 5
    num_epochs: int = 3                       # IRN 3, PSA/SEAM 8
    batch_size: int = 16                      # IRN 32, PSA/SEAM 8
    lr: float = 0.1                           # IRN 0.1 (heads; displacement 10x); PSA 0.1, SEAM 0.01
    weight_decay: float = 1e-4                # IRN 1e-4, PSA/SEAM 5e-4
    optimizer: str = "sgd"                    # sgd | adamw
    momentum: float = 0.9                     # SGD momentum
    momentum_quirk: bool = False              # IRN/PSA quirk: SGD gets weight_decay as its momentum
    poly_power: float = 0.9                   # learning rate x (1 - progress)^poly_power
    scale_range: tuple[float, float] = (0.5, 1.5)   # IRN random rescale; PSA/SEAM: (1, 1)
    crop_size: int = 112                      # IRN 512, PSA/SEAM 448
    color_jitter: float = 0.0                 # PSA/SEAM 0.3; the same ColorJitter as TrainCAM's
    displacement: bool = False                # IRNet's displacement branch (instances only)
    # a2gnn (A2GNN's affinity CNN, stages/affinity/a2gnn.py): a dense square window replaces the half disc of `radius`:
    window_radius: int = 3                    # A2GNN: 3 (image, point seeds), 4 (box, scribble seeds)
    gated_weight: float = 3.0                 # A2GNN: 3 x the RGB-XY gated feature-distance penalty
    gated_sigma_rgb: float = 0.1              # A2GNN: 0.1 on the ImageNet-normalised image
    gated_sigma_xy: float = 6.0               # A2GNN: 6 grid cells
    # The run's seed: initial weights, the order of the images and their augmentation
    seed: int = 0


@dataclass(frozen=True)
class PropagateConfig:
    """``[Propagate]``: random walk from the CAMs over the learned affinities, then pseudo labels."""

    propagation: str = "rw_irn"               # registry: stages.propagation.PROPAGATION_METHODS
    beta: float = 10.0                        # affinity power: IRN 10, PSA/SEAM 8
    # t: IRN/PSA 256, SEAM 64 (VOC); auto = scaled with the training images' grid area (stages/auto.py),
    # auto:<t> scales another reference t (SEAM's presets: auto:64)
    steps: int = 256
    radius: int = 5                           # inference pair radius (both)
    bg_threshold: float = 0.25                # rw_irn: constant background after global-max normalisation
    alpha: float = 16.0                       # rw_psa: propagated background (1 - max)^alpha; SEAM 6
    empty_seeds: str = "cam"                  # image whose seeds are all ignore: cam (CAM label) | propagate
    cam_bg_threshold: float = 0.15            # background threshold of that CAM label
    shard_size: int = 256                     # images per shard file (one task each)
    # gcn (WSGCN-I, stages/propagation/gcn.py), WSGCN's values; beta and radius above build its walk:
    gcn_walk_steps: int = 256                 # t of T^t. WSGCN 256 (VOC grids); auto: scaled as `steps`
    gcn_adjacency: str = "dense"              # dense: T^t N x N (the reference) | topk: k largest per column of T^t
    gcn_topk: int = 512                       # topk: entries kept per column
    gcn_dense_max_mib: float = 4096.0         # dense: refuse (naming the image) a T^t needing more memory than this
    gcn_alpha_low: float = 4.0                # partial labels: la CRF on [(1 - max CAM)^4; CAMs]
    gcn_alpha_high: float = 32.0              # ha CRF, and the confident-background score (1 - max)^32
    gcn_crf_gaussian: tuple[float, float] = (4.0, 3.0)                # sxy, compat (on the stride-4 image)
    gcn_crf_bilateral: tuple[float, float, float] = (20.0, 3.0, 10.0)  # sxy, srgb, compat
    gcn_crf_iterations: int = 10              # mean-field iterations of the la/ha CRFs
    gcn_top_fraction: float = 0.3             # confident: top 30% of a class's CAM inside its argmax region...
    gcn_cam_floor: float = 0.1                # ...among its values above 0.1
    gcn_bg_confidence: float = 0.8            # confident background: (1 - max)^32 wins the argmax and exceeds this
    gcn_crf_confidence: float = 0.8           # max of [ha background, la classes] must reach this
    gcn_hidden: int = 16                      # GCN 160 -> hidden -> classes
    gcn_dropout: float = 0.3                  # dropout on the GCN's input and hidden features
    gcn_lr: float = 0.01                      # Adam
    gcn_weight_decay: float = 5e-4            # Adam weight decay
    gcn_epochs: int = 250                     # full-batch epochs, a fresh GCN per image
    gcn_entropy_weight: float = 10.0          # x entropy on unlabelled nodes
    gcn_smooth_weight: float = 0.01           # x tr(Z^T L Z) / N on the log-probabilities
    gcn_seed: int = 42                        # per-image seed = hash(gcn_seed, image id); WSGCN seeds once with 42
    # a2gnn (A2GNN, stages/propagation/a2gnn.py): the reference's values; 0 = the reference value for the image's
    # supervision:
    a2gnn_hidden: int = 256                   # A2GNN: 256 hidden units
    a2gnn_layers: int = 3                     # A2GNN: 3 affinity-attention layers
    a2gnn_dropout: float = 0.5                # A2GNN: 0.5 on the embedding
    a2gnn_affinity_weight: float = 10.0       # A2GNN: attention logit beta cos + 10 A
    a2gnn_lr: float = 0.0                     # Adam; 0 = A2GNN's 0.03 (image, point, scribble) | 0.035 (box)
    a2gnn_weight_decay: float = 5e-4          # A2GNN: 5e-4
    a2gnn_seed_epochs: int = 0                # phase 1 (seed loss); 0 = A2GNN's 50 | 150 (box)
    a2gnn_gcrf_epochs: int = 0                # phase 2 (+ Gated CRF); 0 = A2GNN's 50 | 150 (box)
    a2gnn_gcrf_weight: float = 0.0            # 0 = A2GNN's 0.3 | 0.01 (box)
    a2gnn_gcrf_radius: int = 5                # A2GNN: 5 (grid cells)
    a2gnn_gcrf_sigma_xy: float = 6.0          # A2GNN: 6 (grid cells)
    a2gnn_gcrf_sigma_rgb: float = 0.1         # A2GNN: 0.1 (ImageNet-normalised image)
    a2gnn_mp_weight: float = 1.0              # box multi-point loss; A2GNN 1
    # Where the seed, multi-point and consistency losses read the GNN: "image" = its logits and embeddings upsampled
    # bilinearly onto the padded image, every labelled pixel counted (A2GNN); "grid" = the stride-s nodes, seeds
    # sampled at block centres (cheaper; seeds smaller than a block can be missed; other labels, see the README).
    a2gnn_loss_resolution: str = "image"      # image | grid
    a2gnn_rw: bool = True                     # fuse the random walk (image and point supervision only); A2GNN on
    a2gnn_rw_weight: float = 3.0              # A2GNN: p = softmax + 3 rw
    a2gnn_rw_beta: float = 8.0                # A2GNN: A^8
    a2gnn_rw_logt: int = 6                    # A2GNN: 2^6 = 64 steps; auto: 2^t scaled as `steps`
    a2gnn_rw_alpha: float = 6.0               # A2GNN: background (1 - max CAM)^6
    # A2GNN ends with a dense CRF (a2gnn_final); in the pipeline RefineCRF applies it (its default preset), so that
    # the report shows the labels before and after it. A preset name here applies it inside the method too.
    a2gnn_crf_preset: str = ""                # stages.refine.crf.CRF_PRESETS name; "" = none (RefineCRF does it)
    a2gnn_seed: int = 42                      # per-image seed = hash(a2gnn_seed, image id); A2GNN does not seed
    a2gnn_batch_images: int = 16              # images trained together in one process; results do not depend on it


@dataclass(frozen=True)
class EvalPseudoLabelsConfig:
    """``[EvalPseudoLabels]``: pseudo labels (and seeds) scored against GT on the eval list."""

    pred_ignore: str = "background"           # predicted 255: background (IRN) | exclude (WSGCN)


METHOD_CRF = "method"   # RefineCRF.preset: the propagation method's own final CRF


@dataclass(frozen=True)
class RefineCRFConfig:
    """``[RefineCRF]``: dense CRF on the propagated class scores (stages.refine.crf presets)."""

    # registry: stages.refine.crf.CRF_PRESETS, or "method": the final CRF of the propagation method's paper (its
    # record's final_crf: a2gnn_final, wsgcn_final, dgcn_test for graphcut and dsrg; IRN and PSA have none in code)
    preset: str = "a2gnn_final"
    shard_size: int = 256                     # images per shard file (one task each)


@dataclass(frozen=True)
class TrainSegmentationConfig:
    """``[TrainSegmentation]``: DeepLab retrained on the pseudo labels (and, as its own task, on GT: the ceiling).

    deeplab-pytorch's VOC recipe is in the comments and in configs/voc.cfg; the defaults size it for the demo.
    """

    model: str = "deeplabv2"                  # registry: models.segmenters.SEGMENTERS (deeplabv2 | deeplabv3plus |
    #                                           deeplabv3 | deeplabv3_ddd: DeepLab-v3 + DDD's learned grid CRF)
    backbone: str = "resnet_mini"             # deeplab-pytorch: resnet101 (DeepLab-v2), resnet50/101 (v3+)
    output_stride: int = 0                    # 0 = the model's own (v2: 8, v3/v3+: 16); deeplabv3(_ddd): 8 | 16
    ddd_iterations: int = 5                   # deeplabv3_ddd's CRF: DP passes (DDD reference: 5; block4/Xception 15)
    ddd_gamma: float = 2.0                    # smoothing temperature of the chain DP (reference 2.0; 0 = hard max)
    ddd_distances: int = 2                    # pairwise terms at distances 1..K (reference NUM_PAIRWISE_TERMS = 2)
    ddd_alpha: float = 0.0                    # update step; 0 = 1 / max(H, W) of the logits' grid (reference)
    ddd_early_stop: float = 1e-4              # keep the previous pass once an image's dual rises this much; 0 = never
    ddd_backend: str = "function"             # function (recompute in backward: O(B C H W) per pass) | autograd
    pretrained: str = ""                      # ImageNet weights (.pth, torchvision layout) | synthetic
    init_checkpoint: str = ""                 # a whole segmenter's weights (e.g. COCO-trained), loaded where they fit
    msc: bool = False                         # deeplab-pytorch: true (inputs 1, 0.75, 0.5; pixel-wise max)
    freeze_bn: bool = True                    # deeplab-pytorch: BN stays on the pretrained statistics
    # train on: crf (RefineCRF output) | propagated (before the CRF) | agreed (ours: the CRF's label where it keeps
    # the propagated one, ignored where the CRF changed it; the references train on every pixel of the crf labels)
    pseudo_labels: str = "crf"
    iterations: int = 1500                    # deeplab-pytorch: 20000
    batch_size: int = 10                      # deeplab-pytorch: 5, with accumulation 2 (effective batch 10)
    accumulation: int = 1                     # batches whose gradients are summed per optimiser step
    lr: float = 0.01                          # deeplab-pytorch: 2.5e-4 from a COCO-trained DeepLab-v1
    lr_decay_every: int = 10                  # poly decay stepped every 10 iterations (deeplab-pytorch)
    poly_power: float = 0.9                   # learning rate x (1 - progress)^poly_power
    momentum: float = 0.9                     # SGD momentum
    weight_decay: float = 5e-4                # deeplab-pytorch: 5e-4
    crop_size: int = 112                      # deeplab-pytorch: 321
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)   # random rescale before the crop, one per image
    eval_every: int = 1                       # epochs between val mIoU rows in log.csv (0 = only at the end)
    # training images scored against their training labels beside each val score (train_miou in log.csv): a
    # train mIoU still near val's and rising is an under-trained net, a high one over a low val a hard dataset
    train_eval_images: int = 100
    checkpoint_every: int = 100               # iterations between resume checkpoints
    seed: int = 0                             # seeds the initial weights, the image order and the augmentation


@dataclass(frozen=True)
class EvalSegmentationConfig:
    """``[EvalSegmentation]``: DeepLab on the val list, multi-scale + flip, optional test-time CRF."""

    scales: tuple[float, ...] = (0.75, 1.0, 1.25)   # deeplab-pytorch: (1.0,) with the MSC model
    flip: bool = True                         # deeplab-pytorch: false
    crf: bool = True                          # deeplab-pytorch reports both; the CRF one is the headline
    crf_preset: str = "deeplab_test"          # POS 3/1, BI 4/67/3, 10 iterations
    shard_size: int = 256                     # images per shard file (one task each)
    # A larger val image is predicted (and CRF-refined) downscaled to this many pixels, its labels upsampled
    # (nearest) to full size for scoring: peak memory then stays bounded whatever the image (a 12-megapixel image
    # took 7.5 GiB at full size). 1 MP is 4x VOC's largest (500x500), so VOC is never downscaled; 0 = no limit.
    max_pixels: int = 1_000_000


@dataclass(frozen=True)
class TrainSeedNetConfig:
    """``[TrainSeedNet]``: a segmentation net trained from the seeds while its supervision is regrown every
    iteration (stages.seed_net.train): DGCN (``graphcut``, hustvl/DGCN) or DSRG (``dsrg``, speedinghzl/DSRG).
    Its multi-scale predictions on the training images become the pseudo labels.

    The references' values are in the comments; the defaults size it for the demo.
    """

    method: str = "graphcut"                  # graphcut (DGCN: per-class s-t cut on a kNN graph) | dsrg
    model: str = "deeplabv2"                  # registry: models.segmenters.SEGMENTERS; graphcut needs deeplabv2
    head: str = "aspp"                        # deeplabv2's: aspp (DSRG: dilations 6/12/18/24 summed) | dilated12
    #                                           (DGCN: one 3x3 classifier of dilation 12, DeepLab-LargeFOV's)
    backbone: str = "resnet_mini"             # DGCN, DSRG: resnet101 (DSRG's paper also VGG16)
    pretrained: str = ""                      # ImageNet weights (.pth, torchvision layout) | synthetic
    init_checkpoint: str = ""                 # a whole segmenter's weights, loaded where they fit
    freeze_bn: bool = True                    # BN affine not trained (DGCN, DSRG); false: BN trained fully
    bn_mode: str = "frozen"                   # with freeze_bn, the statistics: frozen = the pretrained running
    #                                           ones (deeplab-pytorch) | batch_stats = each training batch's,
    #                                           running ones updated for eval (DGCN: affine frozen, net in train)
    iterations: int = 450                     # DGCN: 7 epochs x 662 = 4,634; DSRG: 8,000
    batch_size: int = 10                      # DGCN: 16 (2 GPUs x 8); DSRG: 20
    crop_size: int = 112                      # both: 321 (41x41 output grid)
    scales: tuple[float, ...] = (1.0,)        # random rescale before the crop; DGCN: none (scale=False)
    lr: float = 0.001                         # DGCN, DSRG: 5e-4 (from ImageNet ResNet-101); demo value untuned
    momentum: float = 0.9                     # both: 0.9
    weight_decay: float = 5e-4                # both: 5e-4
    head_bias_20x: bool = False               # false: DGCN, head 10x with its bias, decayed; true: deeplab-pytorch
    #                                           / DSRG caffe, head weights 10x, biases 20x without decay
    schedule: str = "step"                    # step (DGCN, DSRG) | poly
    warmup_iterations: int = 20               # linear warm-up; DGCN: 200; DSRG: 0
    step_gamma: float = 0.3                   # step: DGCN 0.3; DSRG 0.33
    step_epochs: int = 3                      # step: x gamma every 3 epochs (DGCN)
    step_iterations: int = 0                  # step: > 0 = every that many iterations instead (DSRG: 1000)
    poly_power: float = 0.9                   # poly: (1 - t/T)^0.9
    dsrg_bg_threshold: float = 0.99           # DSRG th1: background candidates need CRF q > 0.99
    dsrg_fg_threshold: float = 0.85           # DSRG th2: foreground candidates need q > 0.85
    dsrg_connectivity: int = 8                # DSRG: 8-connected growth
    dgcn_k: int = 10                          # DGCN: kNN graph, k = 10 (self included)
    dgcn_seed_capacity: float = 10.0          # DGCN: terminal capacity of seed nodes
    dgcn_update_threshold: float = 0.7        # DGCN: a cut relabels a node only where p_c > 0.7
    crf_gaussian: tuple[float, float] = (3.0 / 12, 3.0)              # both: sxy 3 / scale 12, compat 3
    crf_bilateral: tuple[float, float, float] = (80.0 / 12, 13.0, 10.0)  # both: sxy 80 / 12, srgb 13, compat 10
    crf_iterations: int = 10                  # both: 10
    crf_unary: str = "auto"                   # auto = the method's: DSRG linear (-p), DGCN log (-log p)
    predict_scales: tuple[float, ...] = (0.75, 1.0, 1.25)   # DGCN make_pred: summed logits at 0.75/1/1.25
    checkpoint_every: int = 100               # iterations between resume checkpoints
    seed: int = 0                             # seeds the initial weights, the image order and the augmentation


@dataclass(frozen=True)
class MakeObjectMapsConfig:
    """``[MakeObjectMaps]``: per-image object softmax on train and val, GMNet's conditioning input. Its source is
    the task's ``source`` parameter, set by TrainPartSegmentation.cond_source: gt (one-hot, 255 -> uniform) |
    supervised (TrainSegmentation on GT: GMNet's choice) | wsss (the weak chain's DeepLab) | none (uniform)."""

    scales: tuple[float, ...] = (1.0,)        # supervised/wsss: GMNet's vis_classes.py runs single scale
    flip: bool = True                         # also predict the horizontally flipped image and add it back
    shard_size: int = 256                     # images per shard file (one task each)


@dataclass(frozen=True)
class TrainPartSegmentationConfig:
    """``[TrainPartSegmentation]``: GMNet, a DeepLab-v3+ part segmenter conditioned on object maps, trained with
    part CE + the object auxiliary loss + the graph-matching loss (spec gmnet_ddd_spec.md A.2-A.4).

    GMNet's recipe (configs/voc_part58.cfg) is in the comments; the defaults size it for the demo.
    """

    cond_source: str = "gt"                   # the MakeObjectMaps source; none = plain DeepLab-v3+ (no conditioning)
    part_space: str = "parts.json"            # parts.json (relative to the dataset root) | pascal_part_58 | _108
    part_dir: str = "SegmentationPart"        # part label PNGs under the dataset root (GMNet: label58/gray/all)
    part_object_band: int = 2                 # px from an object border where part and object owners may differ
    backbone: str = "resnet_mini"             # GMNet: resnet_v1_101_beta
    pretrained: str = ""                      # ImageNet weights (.pth, torchvision layout) | synthetic
    init_checkpoint: str = ""                 # a whole segmenter's weights, loaded where they fit
    freeze_bn: bool = True                    # GMNet: BN frozen everywhere
    cond_mult: float = 0.0                    # conditioning widths x this; 0 = head width / 256 (1 for ResNet-101)
    cond_pad: int = 0                         # object-map crop padding: 0 | 255 (GMNet's quirk)
    cond_stride: int = 1                      # object maps avg-pooled by this before the conditioning net; GMNet: 1
    gm_mode: str = "st"                       # off | hard (GMNet's released loss: no gradient) | soft | st
    gm_lambda: float = 0.1                    # GMNet: 0.1
    gm_dilation: int = 2                      # GMNet: 2 (flat 2x2 max filter, TF SAME)
    gm_valid: str = "same"                    # same (prediction counted where the label is valid) | pred_all (GMNet)
    # label (GMNet: logits upsampled to the crop, the loss on every label pixel) | logits (ours: labels sampled
    # at the logits' stride-4 grid, 16x fewer pixels; the CE and aux losses stay at the crop's size)
    gm_resolution: str = "label"
    aux_lambda: float = 1e-4                  # GMNet: 1e-4 (part logits summed per object, CE on object GT)
    iterations: int = 1500                    # GMNet: 50,000
    batch_size: int = 10                      # GMNet: 10
    lr: float = 0.01                          # GMNet: 0.005
    lr_decay_every: int = 1                   # GMNet: poly every step
    poly_power: float = 0.9                   # learning rate x (1 - progress)^poly_power
    momentum: float = 0.9                     # SGD momentum
    weight_decay: float = 1e-4                # GMNet: 1e-4
    head_lr_mult: float = 10.0                # new layers' weights; GMNet: 1
    bias_lr_mult: float = 2.0                 # new layers' biases, x head_lr_mult; GMNet: 2
    crop_size: int = 112                      # GMNet: 513
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)   # GMNet: 0.5-2.0 in 0.25 steps
    eval_every: int = 0                       # epochs between val part-mIoU rows in log.csv (0 = only at the end)
    checkpoint_every: int = 100               # iterations between resume checkpoints
    seed: int = 0                             # seeds the initial weights, the image order and the augmentation


@dataclass(frozen=True)
class EvalPartsConfig:
    """``[EvalParts]``: the part segmenter on val (GMNet's eval.py: single scale) and its metrics."""

    flip: bool = False                        # GMNet: single scale, no flip
    # parts that the image cannot identify (embedded data: disc and ring rotate freely and look the same under
    # a half turn); mIoU is also reported without them. Names not in the part space are skipped.
    unidentifiable: tuple[str, ...] = ("disc.upper", "disc.lower", "ring.upper", "ring.lower")
    shard_size: int = 256                     # images per shard file (one task each)


@dataclass(frozen=True)
class ReportConfig:
    """``[Report]``: the run's HTML report."""

    gallery_images: int = 6                   # eval images shown side by side through every stage
    # Methods run beside the main chain from the same CAMs, compared side by side in the report (pipeline.variants):
    # a recipe preset, the method as its paper runs it from the seeds on (e.g. ["demo_irn.cfg", "demo_dgcn.cfg"]),
    # or "propagation[/supervision]@main", the method on the main chain's seeds (e.g. "gcn@main", "a2gnn/box@main")
    compare: tuple[str, ...] = ()
    compare_segmentation: bool = True         # also retrain DeepLab on each compared method's pseudo labels
    # GMNet part runs compared in the report's parts section (pipeline.variants.part_run), each an EvalParts of
    # [TrainPartSegmentation] with "source/gm_mode[/gm_lambda]" overridden, e.g. ["none/off", "gt/st", "gt/st/10"];
    # empty = no parts section. The gallery shows each conditioning source's first entry.
    parts_compare: tuple[str, ...] = ()
    # Segmenters trained beside the main one on the same pseudo labels and on GT, each scored on val with and without
    # the dense CRF in one table: "model[:knob=value,...]" with TrainSegmentation knobs, e.g.
    # ["deeplabv3:output_stride=8", "deeplabv3_ddd:output_stride=8"] (DeepLab-v3 without and with DDD)
    compare_segmenters: tuple[str, ...] = ()
    # Co-occurrence flag (stages.report.cooccurrence): a class is flagged as having learned its context when at least
    # this share of its final pseudo-label pixels is GT background on the eval images (the boat/water failure);
    # in (0, 1], 1 flags only classes whose every pseudo-label pixel is background
    cooccurrence_flag: float = 0.5


STAGE_CONFIGS = {
    "PrepareDataset": DatasetConfig,
    "PretrainBackbone": PretrainBackboneConfig,
    "TrainCAM": TrainCAMConfig,
    "MakeCAM": MakeCAMConfig,
    "EvalCAM": EvalCAMConfig,
    "ExtractSeeds": ExtractSeedsConfig,
    "TrainAffinity": TrainAffinityConfig,
    "Propagate": PropagateConfig,
    "EvalPseudoLabels": EvalPseudoLabelsConfig,
    "RefineCRF": RefineCRFConfig,
    "TrainSegmentation": TrainSegmentationConfig,
    "EvalSegmentation": EvalSegmentationConfig,
    "TrainSeedNet": TrainSeedNetConfig,
    "MakeObjectMaps": MakeObjectMapsConfig,
    "TrainPartSegmentation": TrainPartSegmentationConfig,
    "EvalParts": EvalPartsConfig,
    "Report": ReportConfig,
}

@dataclass(frozen=True)
class AutoRule:
    """How ``auto`` fits a knob to the data (stages/auto.py). ``kind = walk``: a walk length scaled with the
    grid area at ``stride`` (``log2``: the knob holds log2 of the steps); ``references`` are the papers' values on
    VOC. ``kind = passes``: a training length (``iterations``, or ``epochs`` when ``unit`` says so) that makes
    ``references`` passes over the training pixels (the first scales a bare ``auto``; a hand-set value is
    compared with each); iterations are rounded to ``round_to``. ``kind = crop``: a square crop, ``references`` its
    share of the median image's pixels. ``kind = resize``: a (low, high) range of the resized longer side,
    ``references`` pairs of shares of the median image's longer side."""

    references: tuple[float, ...] | tuple[tuple[float, float], ...]
    stride: int = 4
    log2: bool = False
    read_when: tuple[str, tuple[str, ...]] | None = None   # (knob, its values under which this knob is read)
    kind: str = "walk"
    unit: str = "iterations"
    round_to: int = 1

    def is_read(self, cfg: object) -> bool:
        return self.read_when is None or getattr(cfg, self.read_when[0]) in self.read_when[1]


# Knobs that take ``auto`` or ``auto:<reference>`` (a reference value of one's own, e.g. SEAM's t = 64), fitted
# to the dataset's scale when the stage runs (stages/auto.py): section -> knob -> rule.
AUTO_KNOBS: dict[str, dict[str, AutoRule]] = {
    "Propagate": {
        "steps": AutoRule((256, 64), 4, read_when=("propagation", ("rw_irn", "rw_psa"))),  # IRN, PSA 256; SEAM 64
        "gcn_walk_steps": AutoRule((256,), 4, read_when=("propagation", ("gcn",))),        # WSGCN
        "a2gnn_rw_logt": AutoRule((6,), 8, log2=True, read_when=("propagation", ("a2gnn",))),  # A2GNN: 2^6, stride 8
    },
    # Crops (kind crop): the square's share of the median training image, so a crop shows as much of an image on
    # any data (VOC's median image 500 x 375 = 187,500 px): deeplab-pytorch, DGCN and DSRG 321^2 = 0.55, DDD 513^2
    # = 1.40, IRN 512^2 = 1.40, PSA/SEAM 448^2 = 1.07. Resolved first: the training length below depends on it.
    # Training lengths (kind passes): passes over the training pixels on VOC (train_aug, 10,582 images), from each
    # reference's schedule: iterations x batch x the image pixels a crop shows / (images x pixels per image).
    # deeplab-pytorch: 20,000 x 10 x 321^2 / (10,582 x 187,500) = 10.4; the same rule for the ceiling. DDD's
    # DeepLab-v3: 33,000 x 16 crops of 513^2, which hold the whole image: 49.9.
    # The CAM net's resize-long range in shares of the median image's longer side, then its crop: IRN (320, 640) of
    # VOC's 500 = (0.64, 1.28) and 512^2 = 1.40 of the image; PSA (256, 512) = (0.512, 1.024) and SEAM (448, 768) =
    # (0.896, 1.536), both with 448^2 = 1.07. A net trained on images resized for other data sees its objects at
    # another scale in training than at inference (MakeCAM's scales are shares of the image as it is).
    "TrainCAM": {"resize_long": AutoRule(((0.64, 1.28), (0.512, 1.024), (0.896, 1.536)), kind="resize"),
                 "crop_size": AutoRule((1.40, 1.07), kind="crop", round_to=8)},
    "TrainSegmentation": {"crop_size": AutoRule((0.55, 1.40), kind="crop", round_to=8),
                          "iterations": AutoRule((10.4, 49.9), kind="passes", round_to=10)},
    # IRN: 3 epochs with 512 crops, which hold VOC's whole images: 3 passes. PSA/SEAM's AffinityNet: 8 x 448 x 448
    # crops of 500 x 375 images (the crop holds 448 x 375 of them) = 7.2.
    "TrainAffinity": {"crop_size": AutoRule((1.40, 1.07), kind="crop", round_to=8),
                      "num_epochs": AutoRule((3.0, 7.2), kind="passes", unit="epochs")},
    # DGCN: 7 epochs of 321^2 crops = 7 x 103,041 / 187,500 = 3.85; DSRG: 8,000 x 20 x 321^2 / (10,582 x 187,500)
    # = 8.3.
    "TrainSeedNet": {"crop_size": AutoRule((0.55,), kind="crop", round_to=8),
                     "iterations": AutoRule((3.85, 8.3), kind="passes", round_to=10)},
}
AUTO = "auto"


def is_auto(value: object) -> bool:
    return isinstance(value, str) and (value == AUTO or value.startswith(AUTO + ":"))


def parse_auto(text: str, pair: bool = False) -> str | int | tuple[int, int]:
    """A preset's value of an auto knob: ``auto``, ``auto:<number>`` (``pair``: ``auto:<low>,<high>``), kept as
    text, or an integer (``pair``: a list of two, as ``[80, 160]``)."""
    text = str(text).strip()
    if text == AUTO:
        return text
    if text.startswith(AUTO + ":"):
        numbers = text[len(AUTO) + 1:].split(",")
        try:
            values = [float(n) for n in numbers]
            if len(values) != (2 if pair else 1) or not min(values) > 0:
                raise ValueError
        except ValueError:
            needs = "two positive numbers, as auto:0.64,1.28" if pair else "a positive number, as auto:64"
            raise ValueError(f"{text!r}: auto:<reference> needs {needs}") from None
        return f"{AUTO}:{','.join(f'{v:g}' for v in values)}"
    try:
        if pair:
            values = tuple(int(v) for v in ast.literal_eval(text))
            if len(values) != 2:
                raise ValueError
            return values
        return int(text)
    except (ValueError, TypeError, SyntaxError):
        expected = "a list of two integers" if pair else "an integer"
        raise ValueError(f"{text!r}: {expected}, auto or auto:<reference value> expected") from None


def auto_reference(rule: AutoRule, value: object) -> float | tuple[float, ...]:
    """The reference value a bare or ``auto:<r>`` value scales (a hand-set value: the rule's first)."""
    if isinstance(value, str) and value.startswith(AUTO + ":"):
        numbers = tuple(float(n) for n in value[len(AUTO) + 1:].split(","))
        return numbers if len(numbers) > 1 else numbers[0]
    return rule.references[0]


def section_of(cfg: object) -> str | None:
    """The ``[section]`` (a name of STAGE_CONFIGS) whose dataclass ``cfg`` is, or None."""
    return next((name for name, cls in STAGE_CONFIGS.items() if isinstance(cfg, cls)), None)


def unread_auto_knobs(cfg: object) -> set[str]:
    """The knobs whose ``auto`` rule says this configuration does not read them (``steps`` under graph cut): they
    make nothing this stage outputs, so they stay out of its key."""
    return {k for k, rule in AUTO_KNOBS.get(section_of(cfg), {}).items() if not rule.is_read(cfg)}


def fits_to_data(cfg: object) -> bool:
    """Whether a knob this configuration reads is ``auto`` (its value then comes from stages.auto)."""
    rules = AUTO_KNOBS.get(section_of(cfg), {})
    return any(rule.is_read(cfg) and is_auto(getattr(cfg, knob)) for knob, rule in rules.items())


def with_references(cfg):
    """``cfg`` with each ``auto`` value replaced by the knob's default, for the checks made before the data is
    known (the value the data gives is checked where it is resolved, by the stage that runs with it)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    found = {k: defaults[k] for k in AUTO_KNOBS.get(section_of(cfg), {}) if is_auto(getattr(cfg, k))}
    return dataclasses.replace(cfg, **found) if found else cfg


CHOICES = {
    ("DatasetConfig", "kind"): ("synthetic", "voc"),
    ("DatasetConfig", "image_labels_from"): ("xml", "mask"),
    ("DatasetConfig", "on_bad_input"): ("error", "quarantine"),
    ("DatasetConfig", "fingerprint_mode"): ("stat", "content"),
    ("ExtractSeedsConfig", "supervision"): SUPERVISIONS,
    ("ExtractSeedsConfig", "point_stamp"): ("superpixel", "disk"),
    ("ExtractSeedsConfig", "scribble_label"): ("grown", "affinity"),
    ("EvalCAMConfig", "pred_ignore"): ("background", "exclude"),
    ("TrainCAMConfig", "optimizer"): ("sgd", "adamw"),
    ("TrainAffinityConfig", "optimizer"): ("sgd", "adamw"),
    ("PropagateConfig", "empty_seeds"): ("cam", "propagate"),
    ("PropagateConfig", "gcn_adjacency"): ("dense", "topk"),
    ("EvalPseudoLabelsConfig", "pred_ignore"): ("background", "exclude"),
    ("TrainSegmentationConfig", "pseudo_labels"): ("crf", "propagated", "agreed"),
    ("TrainSegmentationConfig", "output_stride"): (0, 8, 16),
    ("TrainSegmentationConfig", "ddd_backend"): ("function", "autograd"),
    ("TrainSeedNetConfig", "method"): ("graphcut", "dsrg"),
    ("TrainSeedNetConfig", "schedule"): ("step", "poly"),
    ("TrainSeedNetConfig", "crf_unary"): ("auto", "linear", "log"),
    ("TrainPartSegmentationConfig", "cond_source"): ("gt", "supervised", "wsss", "none"),
    ("TrainPartSegmentationConfig", "gm_mode"): ("off", "hard", "soft", "st"),
    ("TrainPartSegmentationConfig", "gm_valid"): ("same", "pred_all"),
    ("TrainPartSegmentationConfig", "gm_resolution"): ("label", "logits"),
    ("TrainPartSegmentationConfig", "cond_pad"): (0, 255),
}


# Ranges every stage's knobs obey, by name, so a knob added later is covered too: every number is finite and
# non-negative; these are also at most 1 (probabilities, fractions, thresholds on max-normalised scores) ...
UNIT_INTERVAL_WORDS = ("threshold", "confidence", "fraction", "dropout", "gt_prob", "momentum")
UNIT_INTERVAL_KNOBS = {"seam_ecr_top", "seam_min_pool", "box_ring", "box_bg_cam", "gcn_cam_floor", "step_gamma",
                       "color_jitter", "sweep"}
# ... and these strictly positive (sizes, scales, counts that divide or bound a loop).
POSITIVE_WORDS = ("size", "scales", "resize_long", "scale_range", "strides", "beta", "batch")


def _numbers(value: object) -> list:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (tuple, list)):
        return [n for v in value for n in _numbers(v)]
    return []


def unread_knobs(cfg: object) -> tuple[str, ...]:
    """Name prefixes of knobs this configuration never reads (checked, like their code, only where they run): the
    annotation knobs under image-level supervision, another propagation method's own knobs."""
    if isinstance(cfg, ExtractSeedsConfig) and cfg.supervision == "image":
        return ("box_", "point_", "superpixel", "scribble_")
    if isinstance(cfg, PropagateConfig):
        return tuple(f"{method}_" for method in ("gcn", "a2gnn") if method != cfg.propagation)
    return ()


def check_ranges(cfg: object) -> None:
    """Every numeric knob finite and >= 0; probabilities and thresholds in [0, 1]; sizes and scales > 0. The
    error names the knob and the value (``Propagate.beta = nan``)."""
    section = type(cfg).__name__.removesuffix("Config")
    unread = unread_knobs(cfg)
    for f in dataclasses.fields(cfg):
        if unread and f.name.startswith(unread):
            continue
        value = getattr(cfg, f.name)
        numbers = _numbers(value)
        knob = f"{section}.{f.name} = {value!r}"
        if any(not math.isfinite(n) for n in numbers):
            raise ValueError(f"{knob}: must be a finite number")
        if any(n < 0 for n in numbers):
            raise ValueError(f"{knob}: must not be negative")
        unit = f.name in UNIT_INTERVAL_KNOBS or any(word in f.name for word in UNIT_INTERVAL_WORDS)
        if unit and any(n > 1 for n in numbers):
            raise ValueError(f"{knob}: must lie in [0, 1]")
        if any(word in f.name for word in POSITIVE_WORDS) and any(n <= 0 for n in numbers):
            raise ValueError(f"{knob}: must be positive")


def validate(cfg: object) -> None:
    """Reject values a stage cannot use, naming the key (an ``auto`` value as its reference value)."""
    cfg = with_references(cfg)
    name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        allowed = CHOICES.get((name, f.name))
        if allowed and value not in allowed:
            raise ValueError(f"{name}.{f.name} = {value!r}; choose one of {', '.join(map(str, allowed))}")
    check_ranges(cfg)
    if isinstance(cfg, TrainCAMConfig):
        if cfg.lr <= 0 or cfg.batch_size < 1 or cfg.num_epochs < 1 or cfg.crop_size < 8:
            raise ValueError(f"TrainCAM: lr, batch_size, num_epochs and crop_size must be positive: {cfg}")
        if len(cfg.resize_long) != 2 or cfg.resize_long[0] > cfg.resize_long[1]:
            raise ValueError(f"TrainCAM.resize_long must be (low, high), got {cfg.resize_long}")
        if (cfg.frozen_stages > 0 or cfg.freeze_bn) and not cfg.pretrained:
            raise ValueError("TrainCAM.frozen_stages/freeze_bn keep random weights fixed unless "
                             "TrainCAM.pretrained names ImageNet weights (.pth); set it, or unfreeze")
        if len(cfg.strides) != 4:
            raise ValueError(f"TrainCAM.strides needs one stride per ResNet stage (4), got {cfg.strides}")
    if isinstance(cfg, PretrainBackboneConfig):
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.image_size < 32 or cfg.eval_images < 0:
            raise ValueError("PretrainBackbone: steps, batch_size and lr must be positive, image_size >= 32 and "
                             f"eval_images >= 0: {cfg}")
    if isinstance(cfg, MakeCAMConfig):
        if not cfg.scales or min(cfg.scales) <= 0:
            raise ValueError(f"MakeCAM.scales must be positive, got {cfg.scales}")
        if cfg.shard_size < 1:
            raise ValueError("MakeCAM.shard_size must be at least 1")
    if isinstance(cfg, EvalCAMConfig):
        start, stop, step = cfg.sweep
        if step <= 0 or stop < start:
            raise ValueError(f"EvalCAM.sweep must be (start, stop, step>0), got {cfg.sweep}")
    if isinstance(cfg, TrainAffinityConfig):
        if cfg.lr <= 0 or cfg.batch_size < 1 or cfg.num_epochs < 1 or cfg.crop_size < 16:
            raise ValueError(f"TrainAffinity: lr, batch_size, num_epochs and crop_size must be positive: {cfg}")
        if cfg.radius < 2:
            raise ValueError(f"TrainAffinity.radius must be at least 2, got {cfg.radius}")
        low, high = cfg.scale_range
        if not 0 < low <= high:
            raise ValueError(f"TrainAffinity.scale_range must be (low, high), 0 < low <= high: {cfg.scale_range}")
    if isinstance(cfg, TrainSegmentationConfig):
        if (cfg.lr <= 0 or cfg.batch_size < 1 or cfg.iterations < 1 or cfg.accumulation < 1
                or cfg.lr_decay_every < 1 or cfg.checkpoint_every < 1 or cfg.eval_every < 0):
            raise ValueError("TrainSegmentation: lr, batch_size, iterations, accumulation, lr_decay_every and "
                             f"checkpoint_every must be positive, eval_every >= 0: {cfg}")
        if cfg.crop_size < 16 or not cfg.scales or min(cfg.scales) <= 0:
            raise ValueError(f"TrainSegmentation: crop_size >= 16 and positive scales required: {cfg}")
        if cfg.ddd_iterations < 1 or cfg.ddd_gamma < 0 or cfg.ddd_distances < 1 or cfg.ddd_alpha < 0 \
                or cfg.ddd_early_stop < 0:
            raise ValueError("TrainSegmentation: ddd_iterations and ddd_distances must be >= 1, ddd_gamma, "
                             f"ddd_alpha and ddd_early_stop >= 0: {cfg}")
        if cfg.freeze_bn and not (cfg.pretrained or cfg.init_checkpoint):
            raise ValueError("TrainSegmentation.freeze_bn keeps random BatchNorm statistics unless "
                             "TrainSegmentation.pretrained (ImageNet .pth | synthetic) or init_checkpoint is set; "
                             "set one, or freeze_bn = false")
    if isinstance(cfg, EvalSegmentationConfig):
        if not cfg.scales or min(cfg.scales) <= 0 or cfg.shard_size < 1:
            raise ValueError(f"EvalSegmentation: positive scales and shard_size >= 1 required: {cfg}")
    if isinstance(cfg, RefineCRFConfig) and cfg.shard_size < 1:
        raise ValueError("RefineCRF.shard_size must be at least 1")
    if isinstance(cfg, MakeObjectMapsConfig) and (not cfg.scales or min(cfg.scales) <= 0 or cfg.shard_size < 1):
        raise ValueError(f"MakeObjectMaps: positive scales and shard_size >= 1 required: {cfg}")
    if isinstance(cfg, TrainPartSegmentationConfig):
        if (cfg.lr <= 0 or cfg.batch_size < 1 or cfg.iterations < 1 or cfg.lr_decay_every < 1
                or cfg.checkpoint_every < 1 or cfg.eval_every < 0 or cfg.gm_dilation < 1 or cfg.cond_stride < 1
                or cfg.cond_mult < 0 or cfg.gm_lambda < 0 or cfg.aux_lambda < 0 or cfg.part_object_band < 0):
            raise ValueError("TrainPartSegmentation: lr, batch_size, iterations, lr_decay_every, checkpoint_every, "
                             "gm_dilation and cond_stride must be positive; eval_every, cond_mult, gm_lambda, "
                             f"aux_lambda and part_object_band >= 0: {cfg}")
        if cfg.crop_size < 16 or not cfg.scales or min(cfg.scales) <= 0:
            raise ValueError(f"TrainPartSegmentation: crop_size >= 16 and positive scales required: {cfg}")
        if cfg.freeze_bn and not (cfg.pretrained or cfg.init_checkpoint):
            raise ValueError("TrainPartSegmentation.freeze_bn keeps random BatchNorm statistics unless "
                             "TrainPartSegmentation.pretrained or init_checkpoint is set; set one, or "
                             "freeze_bn = false")
    if isinstance(cfg, EvalPartsConfig) and cfg.shard_size < 1:
        raise ValueError("EvalParts.shard_size must be at least 1")
    if isinstance(cfg, ReportConfig):
        if cfg.gallery_images < 0:
            raise ValueError("Report.gallery_images must be >= 0")
        if len(set(cfg.compare)) != len(cfg.compare):
            raise ValueError(f"Report.compare lists a method twice: {list(cfg.compare)}")
        if len(set(cfg.parts_compare)) != len(cfg.parts_compare):
            raise ValueError(f"Report.parts_compare lists a run twice: {list(cfg.parts_compare)}")
        if len(set(cfg.compare_segmenters)) != len(cfg.compare_segmenters):
            raise ValueError(f"Report.compare_segmenters lists a model twice: {list(cfg.compare_segmenters)}")
        if not 0 < cfg.cooccurrence_flag <= 1:
            raise ValueError(f"Report.cooccurrence_flag = {cfg.cooccurrence_flag!r}: a share of pixels in (0, 1]")


def all_knobs() -> dict[str, dict[str, object]]:
    """Section name -> {knob: default}, for ``python -m pipeline config``."""
    sections = {"wsss": RuntimeConfig, **STAGE_CONFIGS}
    return {sec: {f.name: f.default for f in dataclasses.fields(cls)} for sec, cls in sections.items()}




def _comment_lines(source: str) -> dict[int, tuple[int, str, bool]]:
    """Line -> (column of its text, the text, whether code precedes it on that line) for every comment."""
    comments: dict[int, tuple[int, str, bool]] = {}
    code_lines: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            column = tok.start[1] + len(tok.string) - len(tok.string.lstrip("#").lstrip())
            comments[tok.start[0]] = (column, text, tok.start[0] in code_lines)
        elif tok.type not in skip:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return comments


def _field_help(fields: list[ast.AnnAssign], comments: dict[int, tuple[int, str, bool]]) -> dict[str, str]:
    """Each field's documentation: the full-line comments just above it (``# text`` at its indentation), its
    trailing comment and the comment lines continuing that (text indented further). A block that ends in ':' heads
    every field below it up to the next block."""
    docs: dict[str, str] = {}
    heading = ""
    for node in fields:
        column, above, line = node.col_offset + 2, [], node.lineno - 1
        while line in comments and not comments[line][2] and comments[line][0] == column:
            above.insert(0, comments[line][1])
            line -= 1
        if above:
            block = " ".join(above)
            heading = block if block.endswith(":") else ""
        own = [comments[node.end_lineno][1]] if comments.get(node.end_lineno, (0, "", False))[2] else []
        line = node.end_lineno + 1
        while line in comments and not comments[line][2] and comments[line][0] > column:
            own.append(comments[line][1])
            line += 1
        lead = " ".join(above) if above else heading
        docs[node.target.id] = " ".join(" ".join([lead, *own]).split())
    return docs


@functools.cache
def knob_help() -> dict[str, dict[str, str]]:
    """Section name -> {knob: its documentation in this file}, for the command line's ``--help-all`` and
    ``python -m pipeline config``: read from the source, so the comment beside a knob is its only description."""
    source = Path(__file__).read_text()
    comments = _comment_lines(source)
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    sections = {"wsss": RuntimeConfig, **STAGE_CONFIGS}
    return {section: _field_help([n for n in classes[cls.__name__].body if isinstance(n, ast.AnnAssign)], comments)
            for section, cls in sections.items()}
