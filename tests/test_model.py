"""The model's contract: sizes, class-permutation equivariance, reference quirks, fine-tuning selection, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import catseg
from catseg.aggregator import linear_attention
from catseg.model import CATSeg

CLASSES = ["cat", "dog", "building, edifice", "sky", "road"]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "aggregator", "upsample", "clip", "trainable_clip"),
    [
        ("vit_b16", 2.31e6, 2.36e6, 149.6e6, 20.45e6),
        ("vit_l14", 2.64e6, 3.15e6, 427.9e6, 64.49e6),
    ],
)
def test_parameter_counts_match_the_reference(name, aggregator, upsample, clip, trainable_clip):
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = CATSeg(catseg.get_config(name))
    catseg.configure_finetuning(model)
    # the reference's "aggregator" module holds our aggregator and decoder
    assert _count(model.aggregator) + _count(model.decoder) == pytest.approx(aggregator, rel=5e-3)
    assert _count(model.upsample1) + _count(model.upsample2) == pytest.approx(upsample, rel=5e-3)
    assert _count(model.backbone) == pytest.approx(clip, rel=5e-3)
    trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    assert trainable == pytest.approx(trainable_clip, rel=5e-3)


def test_logits_have_one_96x96_map_per_class_for_any_input_size(tiny_model):
    images = torch.rand(2, 3, 123, 77) * 255
    with torch.no_grad():
        logits = tiny_model(images, CLASSES)
    assert logits.shape == (2, len(CLASSES), 96, 96)
    assert torch.isfinite(logits).all()


def test_permuting_classes_permutes_logits(tiny_model):
    images = torch.rand(1, 3, 384, 384) * 255
    order = [3, 0, 4, 2, 1]
    with torch.no_grad():
        logits = tiny_model(images, CLASSES)
        permuted = tiny_model(images, [CLASSES[i] for i in order])
    torch.testing.assert_close(permuted, logits[:, order], atol=1e-5, rtol=1e-5)


def test_embeddings_are_unit_norm_and_use_the_first_synonym(tiny_model):
    with torch.no_grad():
        emb = tiny_model.embed_classes(["building, edifice", "building"])
    assert emb.shape == (2, 1, tiny_model.backbone.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 1))
    torch.testing.assert_close(emb[0], emb[1])


def test_precomputed_embeddings_give_the_same_logits_as_names(tiny_model):
    images = torch.rand(1, 3, 384, 384) * 255
    with torch.no_grad():
        by_name = tiny_model(images, CLASSES)
        by_embedding = tiny_model(images, tiny_model.embed_classes(CLASSES))
    torch.testing.assert_close(by_name, by_embedding)


def test_more_than_256_classes_keeps_the_top_256_per_image(tiny_model):
    names = [f"thing number {i}" for i in range(300)]
    images = torch.rand(2, 3, 384, 384) * 255
    with torch.no_grad():
        logits = tiny_model(images, names)
        text = tiny_model.embed_classes(names)
        dense, _ = tiny_model.encode_images(images)
        best = catseg.aggregator.cost_volume(dense, text.unsqueeze(0).expand(2, -1, -1, -1)).amax(dim=(1, 3, 4))
    dropped = (logits == -100.0).all(dim=(2, 3))  # B x T
    assert dropped.sum(dim=1).tolist() == [44, 44]
    for b in range(2):
        expected_kept = set(best[b].topk(256).indices.tolist())
        assert set((~dropped[b]).nonzero().flatten().tolist()) == expected_kept


def test_padding_tokens_change_the_result(tiny_model):
    """Linear attention sums over keys, so the learned padding is part of the function."""
    images = torch.rand(1, 3, 384, 384) * 255
    layer = tiny_model.aggregator.layers[0].class_attention
    with torch.no_grad():
        before = tiny_model(images, CLASSES)
        saved = layer.padding_tokens.clone()
        layer.padding_tokens.add_(1.0)
        after = tiny_model(images, CLASSES)
        layer.padding_tokens.copy_(saved)
    assert not torch.allclose(before, after)


def test_counted_padding_key_equals_explicit_padding():
    torch.manual_seed(0)
    real, pad = 5, 251
    q = torch.randn(7, real, 4, 8)
    k_real, v_real = torch.randn(7, real, 4, 8), torch.randn(7, real, 4, 8)
    k_pad, v_pad = torch.randn(7, 1, 4, 8), torch.randn(7, 1, 4, 8)
    explicit = linear_attention(
        q, torch.cat([k_real, k_pad.expand(-1, pad, -1, -1)], 1), torch.cat([v_real, v_pad.expand(-1, pad, -1, -1)], 1)
    )
    counts = torch.tensor([1.0] * real + [pad])
    counted = linear_attention(q, torch.cat([k_real, k_pad], 1), torch.cat([v_real, v_pad], 1), counts)
    torch.testing.assert_close(counted, explicit[:, :real])


def test_training_mode_pools_class_attention(tiny_model):
    images = torch.rand(1, 3, 384, 384) * 255
    with torch.no_grad():
        eval_logits = tiny_model(images, CLASSES)
        tiny_model.train()
        try:
            train_logits = tiny_model(images, CLASSES)
        finally:
            tiny_model.eval()
    assert train_logits.shape == eval_logits.shape
    assert not torch.allclose(train_logits, eval_logits)


def test_finetuning_step_changes_only_the_selected_weights():
    torch.manual_seed(1)
    model = catseg.build_model("tiny").train()
    trainable = catseg.configure_finetuning(model)
    clip_trainable = [n for n in trainable if n.startswith("backbone.")]
    assert clip_trainable and all(n.endswith(("q_proj_weight", "v_proj_weight")) for n in clip_trainable)
    blocks = len(model.backbone.clip.visual.transformer.resblocks) + len(model.backbone.clip.transformer.resblocks)
    assert len(clip_trainable) == 2 * blocks
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = torch.optim.AdamW(catseg.optimizer_param_groups(model))
    images = torch.rand(2, 3, 384, 384) * 255
    targets = torch.randint(0, 3, (2, 384, 384))
    targets[:, :10] = 255
    loss = catseg.segmentation_loss(model(images, ["red", "green", "blue"]), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), catseg.finetune.GRAD_CLIP_NORM)
    optimizer.step()

    # Some trainable tensors get no gradient by construction: the last visual block's q projection (dense mode
    # has no attention) and softmax key biases (softmax ignores a constant shift). All others must move.
    with_gradient = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 1e-10}
    assert len(with_gradient) > 0.8 * len(trainable)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if name in with_gradient:
            assert changed, f"{name} is trainable but did not change"
        elif name not in trainable:
            assert not changed, f"{name} is frozen but changed"
    assert any(n.endswith("k_proj_weight") for n, _ in model.named_parameters())


def test_optimizer_groups_follow_the_reference_solver():
    with torch.device("meta"):
        model = CATSeg(catseg.get_config("tiny"))
    catseg.configure_finetuning(model)
    groups = catseg.optimizer_param_groups(model, lr=1.0, weight_decay=0.5, clip_lr_multiplier=0.01)
    by_param = {id(p): g for g in groups for p in g["params"]}
    q = model.backbone.clip.visual.transformer.resblocks[0].attn.q_proj_weight
    norm = model.aggregator.layers[0].class_attention.norm1.weight
    linear = model.aggregator.layers[0].class_attention.q.weight
    assert (by_param[id(q)]["lr"], by_param[id(q)]["weight_decay"]) == (0.01, 0.5)
    assert (by_param[id(norm)]["lr"], by_param[id(norm)]["weight_decay"]) == (1.0, 0.0)
    assert (by_param[id(linear)]["lr"], by_param[id(linear)]["weight_decay"]) == (1.0, 0.5)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_loss_keeps_ignored_pixels_in_the_mean_with_all_zero_targets():
    logits = torch.randn(1, 3, 4, 4)
    targets = torch.tensor([[0, 1, 2, 255]]).repeat(4, 1).unsqueeze(0)
    expected_target = F.one_hot(targets.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    expected_target[:, :, :, 3] = 0
    expected = F.binary_cross_entropy_with_logits(logits, expected_target)
    torch.testing.assert_close(catseg.segmentation_loss(logits, targets), expected)


def test_loss_refuses_class_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        catseg.segmentation_loss(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 7))


@pytest.mark.parametrize(
    ("classes", "error", "message"),
    [
        ([], ValueError, "empty"),
        (["car", "road", "car"], ValueError, "duplicate class name 'car'"),
        (["car", "  "], ValueError, "#1 is empty"),
        ("car,road", TypeError, "not one string"),
    ],
)
def test_bad_vocabularies_are_refused(tiny_model, classes, error, message):
    with pytest.raises(error, match=message):
        tiny_model(torch.rand(1, 3, 64, 64) * 255, classes)


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "float"),
        (torch.rand(3, 64, 64), ValueError, "B x 3 x H x W"),
        (torch.rand(1, 64, 64, 3), ValueError, "B x 3 x H x W"),
        (torch.rand(1, 1, 64, 64), ValueError, "B x 3 x H x W"),
    ],
)
def test_bad_images_are_refused(tiny_model, images, error, message):
    with pytest.raises(error, match=message):
        tiny_model(images, ["car"])


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="vit_b16"):
        catseg.build_model("vit_h14")


def test_pretrained_tag_offline_fails_fast_and_names_the_alternative():
    with pytest.raises(RuntimeError, match="--checkpoint"):
        catseg.build_model("tiny", clip_pretrained="openai")


def test_window_attention_equals_plain_masked_softmax_attention():
    from catseg.aggregator import SwinBlock

    torch.manual_seed(0)
    block = SwinBlock(dim=32, guidance_dim=8, num_heads=4, resolution=12, window=6, shift=3).eval()
    attention, heads = block.attn, block.attn.num_heads
    windows = torch.randn(2, 3, 4, 36, 32)  # B x T x nW x L x D
    guidance = torch.randn(2, 1, 4, 36, 8)  # per image, broadcast over classes
    with torch.no_grad():
        for mask in (None, block.attn_mask):
            ours = attention(windows, attention.guidance_terms(guidance), mask)
            with_guidance = torch.cat([windows, guidance.expand(-1, 3, -1, -1, -1)], dim=-1)
            q, k = attention.q(with_guidance), attention.k(with_guidance)
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(-2, -3) for t in (q, k, attention.v(windows)))
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            if mask is not None:
                scores = scores + mask.unsqueeze(1)
            plain = attention.proj((scores.softmax(-1) @ v).transpose(-2, -3).flatten(-2))
            assert torch.allclose(ours, plain, atol=1e-5), (mask is None, (ours - plain).abs().max())


def test_split_guidance_convolution_equals_concatenation(tiny_model):
    up = tiny_model.decoder.up1
    x = torch.randn(6, up.up.in_channels, 5, 5)  # 2 images x 3 classes, image-major
    guidance = torch.randn(2, up.up.in_channels - up.up.out_channels, 10, 10)
    with torch.no_grad():
        concatenated = up.conv(torch.cat([up.up(x), guidance.repeat_interleave(3, dim=0)], dim=1))
        assert torch.allclose(up(x, guidance), concatenated, atol=1e-5)
        assert torch.allclose(up(x.contiguous(memory_format=torch.channels_last), guidance), concatenated, atol=1e-5)


@pytest.mark.parametrize(("classes", "chunk", "batch"), [(37, 8, 2), (256, 100, 1), (300, 64, 1)])
def test_streamed_segmentation_equals_the_chunked_and_the_unchunked_model(tiny_model, classes, chunk, batch):
    """T < 256 (padding), T = 256 and T = 300 with truncation off: streaming holds nothing per class across
    chunks, recomputes, and gives the chunked model's logits bit for bit (the unchunked model's to float error)."""
    torch.manual_seed(classes)
    images = torch.rand(batch, 3, 96, 128) * 255
    text = tiny_model.embed_classes([f"thing {i}" for i in range(classes)])
    with torch.inference_mode():
        dense, guidance = tiny_model.encode_images(images)
        chunked = tiny_model.segment(dense, guidance, text, class_chunk=chunk, truncate=False)
        whole = tiny_model.segment(dense, guidance, text, truncate=False)
        parts = list(tiny_model.segment_streamed(dense, guidance, text, class_chunk=chunk))
    assert [p.start for p, _ in parts] == list(range(0, classes, chunk))
    streamed = torch.cat([logits for _, logits in parts], dim=1)
    assert streamed.shape == whole.shape == (batch, classes, 96, 96)
    assert torch.equal(streamed, chunked)
    torch.testing.assert_close(streamed, whole, atol=1e-4, rtol=1e-5)


def test_linear_attention_feature_map_equals_elu_plus_one():
    from catseg.aggregator import elu_plus_one

    x = torch.cat([torch.linspace(-30, 30, 20001), torch.randn(10000) * 3])
    assert torch.allclose(elu_plus_one(x), F.elu(x) + 1, rtol=0, atol=1e-7)
    ours, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn_like(x)
    (elu_plus_one(ours) * weights).sum().backward()
    ((F.elu(plain) + 1) * weights).sum().backward()
    assert torch.allclose(ours.grad, plain.grad, rtol=1e-6, atol=1e-7)


def test_cpu_cache_blocks_give_the_logits_of_whole_chunks(tiny_model, monkeypatch):
    """At CPU inference the Swin blocks and MLPs run a cache-sized block of rows at a time; training and GPUs run
    whole chunks. Both give the same logits."""
    import catseg.aggregator as aggregator

    torch.manual_seed(1)
    images = torch.rand(2, 3, 200, 300) * 255
    with torch.inference_mode():
        text = tiny_model.embed_classes([f"class {i}" for i in range(37)])
        rows_per_class = 2 * tiny_model.backbone.grid_size**2
        assert aggregator.cache_block(images, 37, rows_per_class) < 37  # the blocked path is the one under test
        blocked = tiny_model(images, text, class_chunk=16)
        monkeypatch.setattr(aggregator, "CPU_BLOCK_ROWS", 10**9)
        whole = tiny_model(images, text, class_chunk=16)
    assert (blocked - whole).abs().max() <= 1e-5
    with torch.enable_grad():  # training's path: whole chunks, through autograd
        assert aggregator.cache_block(images, 37, rows_per_class) == 37
        trained = tiny_model(images, text.clone(), class_chunk=16)
    assert (trained.detach() - blocked).abs().max() <= 1e-5


def test_residuals_are_added_in_place_only_when_the_sum_keeps_the_dtype():
    from catseg.aggregator import add_residual

    fresh, residual = torch.randn(4, 8), torch.randn(4, 8)
    expected = residual + fresh
    out = add_residual(fresh, residual)
    assert out.data_ptr() == fresh.data_ptr() and torch.equal(out, expected)
    low = torch.randn(4, 8).bfloat16()  # autocast: a bfloat16 result beside a float32 residual stream
    kept = low.clone()
    promoted = add_residual(low, residual)
    assert promoted.dtype == torch.float32 and torch.equal(promoted, residual + kept) and torch.equal(low, kept)
