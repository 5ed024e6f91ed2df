"""Tiny, randomly initialised configurations of the real architectures every model labeler of issue 3 loads,
saved in the layouts the real weights come in (so they go through the labelers' real loading paths).

Shared by the per-family tests (tests/test_labelers_*.py) and the one job with every labeler
(tests/test_all_labelers.py). Nothing here downloads; every builder is seeded, so a file saved twice holds the
same tensors.
"""

from __future__ import annotations

import io
import json
import os

import torch

from modalmill.labelers.detection import DETR_COCO_LABELS
from modalmill.labelers.semseg import COCO_PANOPTIC_CLASSES, COCO_THING_CLASSES

# labeler settings that suit the tiny models (small inputs; thresholds opened up for random weights)
TEST_SETTINGS = {
    "omnidata_depth": {},  # the Omnidata labelers take the checkpoint's own input size (64 here)
    "omnidata_normal": {},
    "depth_anything": {"input_size": 56},
    "mask2former_coco": {"input_size": 64},
    "detr_coco": {"input_size": 64, "min_score": 0.0, "top_k": 5},
    "dfine_coco": {"input_size": 64, "min_score": 0.0, "top_k": 5},
    # random SAM weights give no mask at SAM's default thresholds: open them up so that instances come out
    "sam": {"model_type": "auto", "points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
            "box_nms_thresh": 0.95},
}

# ---------------------------------------------------------------------- SAM (segment-anything)

SAM_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "img_size": 128,
            "window_size": 4}


def save_tiny_sam(path: str, seed: int = 0) -> str:
    """segment-anything's own Sam at a tiny size, as a plain state dict (like the official sam_vit_*.pth)."""
    from modalmill.labelers.sam import build_sam

    torch.manual_seed(seed)
    torch.save(build_sam(SAM_TINY).state_dict(), path)
    return str(path)


# ---------------------------------------------------------------------- HMR 2.0 (4D-Humans)

HMR2_TINY = {"backbone": {"embed_dim": 32, "depth": 2, "num_heads": 2},
             "head": {"dim": 32, "depth": 2, "heads": 2, "dim_head": 8, "mlp_dim": 48, "context_dim": 32}}


def tiny_hmr2(seed: int = 0):
    from modalmill.labelers.humans import build_hmr2

    torch.manual_seed(seed)
    model = build_hmr2(HMR2_TINY).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (the mean-parameter buffers too)
        for t in model.state_dict().values():
            t.normal_(0, 0.2)
    return model


def save_tiny_hmr2(path: str, model=None) -> str:
    """A converted HMR 2.0 .safetensors (modalmill's names, architecture in the metadata)."""
    from modalmill.labelers import humans

    humans.save_converted((model if model is not None else tiny_hmr2()).state_dict(), str(path), HMR2_TINY)
    return str(path)


# ---------------------------------------------------------------------- DPT-Hybrid (Omnidata), Depth Anything


def tiny_dpt_config():
    from transformers import DPTConfig

    # the DPT-Hybrid layout at toy size; 64-wide ViT (one 64-d head) and 32 BiT groups, as the official one
    return DPTConfig(is_hybrid=True, hidden_size=64, num_hidden_layers=4, num_attention_heads=1,
                     intermediate_size=128, image_size=64, patch_size=16, layer_norm_eps=1e-6,
                     backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[1, 1, 1, 0.5],
                     neck_hidden_sizes=[128, 128, 32, 32], fusion_hidden_size=16, backbone_featmap_shape=[1, 128, 4, 4],
                     backbone_config=dict(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1],
                                          hidden_sizes=[128, 128, 128], embedding_size=32, num_groups=32,
                                          out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True))


def tiny_dpt(out_channels: int, seed: int = 0):
    from modalmill.labelers.depth import build_dpt

    torch.manual_seed(seed)
    model = build_dpt(tiny_dpt_config(), out_channels).eval()
    with torch.no_grad():  # random weights give ~0 after the head's ReLU: make the output vary around 0.5
        model.head.head[4].weight.normal_(0, 3.0)
        model.head.head[4].bias.fill_(0.5)
    return model


def save_official_omnidata(path: str, out_channels: int, seed: int = 0) -> str:
    """A tiny DPT-Hybrid saved the way Omnidata's official .ckpt is: a Lightning dict, Omnidata's names."""
    from modalmill.labelers.depth import transformers_to_omnidata

    state = transformers_to_omnidata(tiny_dpt(out_channels, seed).state_dict())
    state["model.pretrained.model.head.weight"] = torch.zeros(10, 64)  # timm's unused classifier, dropped
    state["model.pretrained.model.head.bias"] = torch.zeros(10)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000}, path)
    return path


def save_tiny_depth_anything(path: str, seed: int = 0) -> str:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                              neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                              depth_estimation_type="relative")
    model = DepthAnythingForDepthEstimation(cfg).eval()
    with torch.no_grad():
        # transformers' init (std 0.02) leaves the neck and head's output constant to 1e-7 at this size: PyTorch's
        # own conv init keeps the signal, so the disparity depends on the input (std ~0.1 around 1, positive)
        for m in [*model.neck.modules(), *model.head.modules()]:
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.reset_parameters()
        model.head.conv3.weight.mul_(20.0)
        model.head.conv3.bias.fill_(1.0)  # a positive disparity everywhere
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------- Mask2Former, DETR


def tiny_mask2former(n_labels: int = 133, names=COCO_PANOPTIC_CLASSES, seed: int = 0):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(seed)
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, num_labels=n_labels, hidden_dim=32, mask_feature_size=32,
                            feature_size=32, num_queries=10, encoder_layers=1, decoder_layers=2, dim_feedforward=64,
                            num_attention_heads=2, encoder_feedforward_dim=64,
                            id2label={i: names[i] for i in range(n_labels)} if names else None)
    return Mask2FormerForUniversalSegmentation(cfg).eval()


def save_tiny_mask2former(path: str, **kw) -> str:
    tiny_mask2former(**kw).save_pretrained(path)
    return path


def tiny_detr(names=DETR_COCO_LABELS, seed: int = 0, favour: str | None = None):
    """A tiny DETR; ``favour`` raises one class's logit so that a random detector finds that class (e.g. people
    for HMR 2.0 to regress)."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    torch.manual_seed(seed)
    resnet = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
                          out_features=["stage4"])
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=resnet, use_pretrained_backbone=False, d_model=32,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20, num_labels=len(names),
                     id2label=dict(enumerate(names)))
    model = DetrForObjectDetection(cfg).eval()
    if favour is not None:
        with torch.no_grad():
            model.class_labels_classifier.bias[list(names).index(favour)] += 6.0
    return model


def save_tiny_detr(path: str, **kw) -> str:
    tiny_detr(**kw).save_pretrained(path)
    return path


def tiny_dfine(names=COCO_THING_CLASSES, seed: int = 0, favour: str | None = None):
    """A tiny D-FINE (HGNetV2 backbone, hybrid encoder, FDR decoder) with COCO's 80 classes; ``favour`` raises one
    class's logit in every decoder layer's classifier so that a random detector finds that class (people for
    HMR 2.0)."""
    from transformers import DFineConfig, DFineForObjectDetection, HGNetV2Config

    torch.manual_seed(seed)
    backbone = HGNetV2Config(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                             stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 64],
                             stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[16, 32, 64, 128],
                             stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
                             stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
                             stage_kernel_size=[3, 3, 5, 5], out_features=["stage2", "stage3", "stage4"])
    cfg = DFineConfig(backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, d_model=32,
                      encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
                      decoder_layers=2, num_queries=12, hidden_expansion=0.5, decoder_n_points=2, num_denoising=0,
                      decoder_in_channels=[32, 32, 32], num_labels=len(names), id2label=dict(enumerate(names)))
    model = DFineForObjectDetection(cfg).eval()
    if favour is not None:
        with torch.no_grad():
            for head in model.model.decoder.class_embed:
                head.bias[list(names).index(favour)] += 8.0
    return model


def save_tiny_dfine(path: str, **kw) -> str:
    tiny_dfine(**kw).save_pretrained(path)
    return path


# ---------------------------------------------------------------------- DINOv2, CLIP, ImageBind

# tiny members of the same open_clip ViT families: ViT-B/16 (QuickGELU, OpenAI CLIP) and ViT-H/14 (GELU, ImageBind)
TINY_CLIP = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
TINY_IMAGEBIND = {"embed_dim": 24,
                  "vision_cfg": {"image_size": 224, "layers": 2, "width": 40, "head_width": 20, "patch_size": 14},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
IB_HEADS = 2  # width 40 / head_width 20


def save_tiny_dinov2(path: str, seed: int = 0) -> str:
    """config.json + model.safetensors, as facebook/dinov2-base."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(path)
    return str(path)


def save_tiny_clip(folder, seed: int = 0) -> dict:
    """The whole tiny CLIP as open_clip's hub .safetensors, plus its architecture JSON: the labeler's config."""
    import open_clip
    from safetensors.torch import save_file

    arch = os.path.join(folder, "tiny-clip-b16.json")
    with open(arch, "w") as f:
        json.dump(TINY_CLIP, f)
    open_clip.add_model_config(arch)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-clip-b16", pretrained=None)
    weights = os.path.join(folder, "open_clip_model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return {"weights": weights, "arch": arch}


def save_tiny_imagebind(folder, seed: int = 0) -> tuple[dict, dict]:
    """A tiny ImageBind checkpoint in the official .pth layout (every modality's keys, ImageBind's names).
    Returns (the labeler's config, the vision state dict in ImageBind's names)."""
    import open_clip

    from modalmill.labelers.imagebind import IMAGEBIND_LN_EPS, open_clip_to_imagebind

    arch = os.path.join(folder, "tiny-imagebind-h14.json")
    with open(arch, "w") as f:
        json.dump(TINY_IMAGEBIND, f)
    open_clip.add_model_config(arch)
    torch.manual_seed(seed)
    model = open_clip.create_model(
        "tiny-imagebind-h14", pretrained=None,
        vision_cfg={**TINY_IMAGEBIND["vision_cfg"], "norm_kwargs": {"eps": IMAGEBIND_LN_EPS}})
    state = open_clip_to_imagebind(model.visual.state_dict())
    # the official checkpoint holds every modality; the labeler must use the vision weights only
    state["modality_trunks.text.blocks.0.attn.in_proj_weight"] = torch.randn(48, 16)
    state["modality_postprocessors.text.1.log_logit_scale"] = torch.tensor(2.0)
    weights = os.path.join(folder, "imagebind_huge.pth")
    torch.save(state, weights)  # a plain tensor dict, as the official .pth
    return {"weights": weights, "arch": arch}, state


# ---------------------------------------------------------------------- BLIP captioner, T5 encoder

WORDS = ("a the of on in with and photo picture cat dog man woman person sitting standing red blue green white "
         "tree house car street table cup coffee rocket sky space astronaut suit grass field").split()
CORPUS = ["a photo of a cat sitting on the street", "a man riding a red bicycle", "two dogs playing in the green park",
          "the astronaut in a white suit", "a cup of coffee on a wooden table", "a rocket on the launch pad"] * 20


def save_tiny_blip(path: str, seed: int = 0) -> str:
    """BLIP model + processor (BERT WordPiece tokenizer, 32 px image processor), as Salesforce/blip-* repos."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)  # transformers 5 ignores vocab_file=: pass vocab=
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": 2, "sep_token_id": 3, "pad_token_id": 0, "eos_token_id": 3},
        projection_dim=16)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(cfg).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_tiny_t5(path: str, seed: int = 0) -> str:
    """A real SentencePiece model (spiece.model, as google/t5-v1_1-xxl ships) + a tiny T5 encoder."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    os.makedirs(path, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    with open(os.path.join(path, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}, f)
    torch.manual_seed(seed)
    T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            feed_forward_proj="gated-gelu")).save_pretrained(path)
    return str(path)
