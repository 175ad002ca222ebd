"""The student model family: contract shapes, sizes, peak picking, prompts, checkpoints."""

from __future__ import annotations

import pytest
import torch

from engines.contract import GraphShape
from training.model.build import build_model, list_models, parameter_counts
from training.model.checkpoint import CheckpointError, load_weights, save_checkpoint
from training.model.mobile_cnn import MobileCNN
from training.model.prompt_encoder import PointPromptEncoder
from training.model.saliency import pick_peaks
from training.model.tiny_vit import TinyViT, TinyViTBlock

TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def _check_fused(name: str, height: int, width: int, k: int, num_classes: int = 3) -> None:
    torch.manual_seed(0)
    model = build_model(name, height=height, width=width, num_classes=num_classes, k=k)
    with torch.no_grad():
        outputs = model.forward_fused(torch.randn(1, 3, height, width))
    shape = GraphShape(height=height, width=width, k=k, num_classes=num_classes, mask_stride=model.mask_stride)
    specs = shape.fused_outputs()
    assert len(outputs) == len(specs)
    for spec, tensor in zip(specs, outputs, strict=True):
        assert tuple(tensor.shape) == spec.shape, spec.name
        assert tensor.dtype == TORCH_DTYPES[spec.dtype], spec.name
    heatmap, points, scores, classes = outputs[:4]
    assert float(heatmap.min()) >= 0.0 and float(heatmap.max()) <= 1.0
    assert bool(((points >= 0) & (points[:, :1] < width) & (points[:, 1:] < height)).all())
    assert bool((classes >= 0).all()) and bool((classes < num_classes).all())
    assert bool((scores[:-1] >= scores[1:]).all()), "peaks come best first"


@pytest.mark.parametrize("name", list_models())
def test_every_model_gives_the_contract_outputs(name: str) -> None:
    _check_fused(name, 128, 256, k=4)


def test_mask_strides() -> None:
    assert build_model("student_cnn", height=64, width=64, k=1).mask_stride == 8
    assert build_model("student_vit", height=64, width=64, k=1).mask_stride == 8
    assert build_model("mobilesam", height=64, width=64, k=1).mask_stride == 4


@pytest.mark.parametrize("name", ["student_cnn", "student_vit"])
def test_non_square_inputs(name: str) -> None:
    # 144x400: grids 9x25 at stride 16 and 18x50 at stride 8, no multiple of any window size.
    _check_fused(name, 144, 400, k=3, num_classes=2)


def test_tiny_vit_pads_windows_for_576x1024() -> None:
    encoder = TinyViT().eval()
    with torch.no_grad():
        features, skip = encoder(torch.randn(1, 3, 576, 1024))
    assert features.shape == (1, 320, 36, 64)
    assert skip.shape == (1, 128, 72, 128)


def test_window_attention_stays_inside_its_window() -> None:
    torch.manual_seed(0)
    block = TinyViTBlock(dim=16, num_heads=2, window_size=7, mlp_ratio=2.0).eval()
    tokens = torch.randn(1, 9, 16, 16)  # BxHxWxC, padded to 14x21: 2x3 windows
    changed = tokens.clone()
    changed[0, 8, 15] = torch.randn(16) * 5  # a token in the bottom-right window
    with torch.no_grad():
        before = block._windowed_attention(tokens)
        after = block._windowed_attention(changed)
    assert before.shape == tokens.shape
    torch.testing.assert_close(before[0, :7, :14], after[0, :7, :14])  # other windows untouched
    assert not torch.allclose(before[0, 7:, 14:], after[0, 7:, 14:])


def test_parameter_budgets() -> None:
    totals = {name: parameter_counts(build_model(name, height=64, width=64, k=1))["total"] for name in list_models()}
    assert totals["student_cnn"] <= 2_400_000
    assert totals["student_cnn_lite"] <= totals["student_cnn"]
    assert totals["student_vit"] <= 6_500_000
    assert 9_300_000 <= totals["mobilesam"] <= 10_100_000
    counts = parameter_counts(build_model("student_cnn", height=64, width=64, k=1))
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]


def test_parameters_do_not_depend_on_input_size() -> None:
    small = parameter_counts(build_model("student_vit", height=64, width=64, k=1))
    large = parameter_counts(build_model("student_vit", height=576, width=1024, k=8))
    assert small == large


def test_peak_picking_finds_planted_peaks_and_suppresses_neighbours() -> None:
    probs = torch.full((1, 3, 12, 24), 0.01)
    probs[0, 1, 3, 5] = 0.9  # class 1 at (x=5, y=3)
    probs[0, 1, 3, 6] = 0.8  # its neighbour: must be suppressed
    probs[0, 0, 3, 6] = 0.85  # another class at the neighbour cell: still below the max over classes
    probs[0, 2, 10, 20] = 0.7  # class 2 at (x=20, y=10)
    probs[0, 0, 0, 0] = 0.3  # class 0 at the corner
    points, scores, classes = pick_peaks(probs, k=3, stride=16)
    assert points.shape == (1, 3, 2) and scores.shape == (1, 3) and classes.shape == (1, 3)
    assert classes.dtype == torch.int64
    torch.testing.assert_close(points[0], torch.tensor([[5.5 * 16, 3.5 * 16], [20.5 * 16, 10.5 * 16], [8.0, 8.0]]))
    torch.testing.assert_close(scores[0], torch.tensor([0.9, 0.7, 0.3]))
    assert classes[0].tolist() == [1, 2, 0]


def test_peak_picking_scores_zero_when_peaks_run_out() -> None:
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    probs = (0.6 - 0.05 * ((ys - 1).abs() + (xs - 1).abs())).view(1, 1, 4, 4)  # one maximum, at (1, 1)
    _, scores, _ = pick_peaks(probs, k=3)
    assert scores[0, 0] == pytest.approx(0.6)
    assert scores[0, 1:].tolist() == [0.0, 0.0]


def test_prompt_encoder_handles_padding_labels() -> None:
    torch.manual_seed(0)
    encoder = PointPromptEncoder(embed_dim=32, input_size=(128, 256), embedding_size=(8, 16))
    coords = torch.tensor([[[10.0, 20.0], [200.0, 100.0], [0.0, 0.0], [50.0, 60.0]]])
    labels = torch.tensor([[1.0, 0.0, -1.0, -1.0]])
    sparse, dense = encoder(coords, labels)
    assert sparse.shape == (1, 4, 32) and dense.shape == (1, 32, 8, 16)
    pad = encoder.not_a_point_embed.weight[0]
    # Padding tokens carry no position: the same embedding wherever they are.
    torch.testing.assert_close(sparse[0, 2], pad)
    torch.testing.assert_close(sparse[0, 3], pad)
    pe = encoder.pe_layer.forward_with_coords(coords, (128, 256))
    torch.testing.assert_close(sparse[0, 0], pe[0, 0] + encoder.point_embeddings[1].weight[0])
    torch.testing.assert_close(sparse[0, 1], pe[0, 1] + encoder.point_embeddings[0].weight[0])
    # Integer labels give the same result as float labels (the decoder graph feeds float32).
    torch.testing.assert_close(encoder(coords, labels.long())[0], sparse)
    assert encoder.get_dense_pe().shape == (1, 32, 8, 16)


def test_click_map_marks_the_cells_at_each_point() -> None:
    """The dense prompt adds each point's label vector around its cell; padding adds nothing."""
    torch.manual_seed(0)
    encoder = PointPromptEncoder(embed_dim=32, input_size=(128, 256), embedding_size=(8, 16))
    coords = torch.tensor([[[40.0, 24.0], [200.0, 104.0]]])  # cell (2, 1); the centre of cell (12, 6)
    no_mask = encoder.no_mask_embed.weight.view(1, -1, 1, 1)
    fg_only = encoder(coords, torch.tensor([[1.0, -1.0]]))[1] - no_mask  # 1xDxhxw
    strength = fg_only[0].norm(dim=0)  # hxw
    assert divmod(int(strength.argmax()), 16) == (1, 2)  # (row, col) of the first point's cell
    assert strength[6, 12] < 1e-3 * strength.max()  # the padded second point adds nothing there
    both = encoder(coords, torch.tensor([[1.0, 0.0]]))[1] - no_mask
    bg = encoder.click_embeddings[0]
    torch.testing.assert_close(both[0, :, 6, 12], bg * 1.0 + fg_only[0, :, 6, 12], atol=1e-4, rtol=1e-4)


def test_decode_with_padded_prompts_and_shared_embedding() -> None:
    torch.manual_seed(0)
    model = build_model("student_cnn", height=128, width=256, k=2)
    with torch.no_grad():
        embedding, skip = model.embed(torch.randn(1, 3, 128, 256))
        coords = torch.tensor([[[64.0, 32.0], [0.0, 0.0]], [[100.0, 90.0], [30.0, 40.0]]])
        labels = torch.tensor([[1.0, -1.0], [1.0, 0.0]])
        masks, iou = model.decode(embedding, skip, coords, labels)
        alone, alone_iou = model.decode(embedding, skip, coords[1:], labels[1:])
    assert masks.shape == (2, 16, 32) and iou.shape == (2,)
    torch.testing.assert_close(masks[1:], alone, atol=1e-5, rtol=1e-5)  # prompt sets are independent
    torch.testing.assert_close(iou[1:], alone_iou, atol=1e-5, rtol=1e-5)


def test_sam_decoder_returns_the_best_multimask_output() -> None:
    torch.manual_seed(0)
    model = build_model("mobilesam", height=64, width=128, k=2)
    seen: list[torch.Tensor] = []
    model.mask_decoder.iou_prediction_head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        embedding, skip = model.embed(torch.randn(1, 3, 64, 128))
        masks, iou = model.decode(embedding, skip, torch.tensor([[[20.0, 30.0]], [[90.0, 10.0]]]), torch.ones(2, 1))
    assert masks.shape == (2, 16, 32)
    torch.testing.assert_close(iou, seen[0][:, 1:].max(dim=1).values)


def test_skip_fusion_changes_the_masks() -> None:
    torch.manual_seed(0)
    model = build_model("student_cnn_s8", height=64, width=128, k=1)
    assert model.mask_decoder.uses_skip
    with torch.no_grad():
        embedding, skip = model.embed(torch.randn(1, 3, 64, 128))
        coords, labels = torch.tensor([[[30.0, 30.0]]]), torch.ones(1, 1)
        with_skip, _ = model.decode(embedding, skip, coords, labels)
        without, _ = model.decode(embedding, None, coords, labels)
    assert skip.shape == (1, model.encoder.skip_channels, 8, 16)
    assert not torch.allclose(with_skip, without)


@pytest.mark.parametrize("name", ["student_cnn", "student_cnn_s8", "student_cnn_lite"])
def test_x2_upscaling_in_token_layout_equals_the_transposed_conv(name: str) -> None:
    # The slim decoder computes the x2 upscaling per image token (one Linear, LayerNorm over the
    # last axis, masks put on the grid last). The reference is SAM's form with the same
    # parameters: transposed conv on the BxDxhxw grid, LayerNorm2d, activation, hypernetwork product.
    torch.manual_seed(0)
    model = build_model(name, height=64, width=128, k=3)
    decoder = model.mask_decoder
    for parameter in decoder.output_upscaling.parameters():  # not the identity LayerNorm of init
        torch.nn.init.normal_(parameter, std=0.3)
    b, h, w, dim = 3, 4, 8, decoder.transformer_dim
    src, hyper_in = torch.randn(b, h * w, dim), torch.randn(b, 1, 32)
    skip = torch.randn(1, model.encoder.skip_channels, 2 * h, 2 * w) if decoder.uses_skip else None
    with torch.no_grad():
        got = decoder._masks_x2(src, hyper_in, h, w, skip)
        grid = decoder.output_upscaling(src.transpose(1, 2).reshape(b, dim, h, w))
        if skip is not None:
            grid = grid + decoder.skip_proj(skip)
        grid = decoder.upscale_act(grid)
        want = (hyper_in @ grid.reshape(b, 32, -1)).reshape(b, 1, 2 * h, 2 * w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lite_encoder_patchifies_to_stride_4() -> None:
    model = build_model("student_cnn_lite", height=64, width=128, k=1)
    with torch.no_grad():
        stem = model.encoder.stem(torch.randn(1, 3, 64, 128))
        features, skip = model.encoder(torch.randn(1, 3, 64, 128))
    assert stem.shape == (1, 24, 16, 32)
    assert skip.shape == (1, model.encoder.skip_channels, 8, 16)
    assert features.shape == (1, 160, 4, 8)
    assert model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.internal_dim == 32
    with pytest.raises(ValueError, match="stem_stride"):
        MobileCNN(stem_stride=3)


def test_build_rejects_bad_numbers() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        build_model("student_cnn", height=100, width=256)
    with pytest.raises(ValueError, match="k must be"):
        build_model("student_cnn", height=64, width=64, k=17)
    with pytest.raises(KeyError, match="unknown model"):
        build_model("resnet")


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("student_cnn", height=64, width=128, k=2)
    path = save_checkpoint(tmp_path / "ckpt.pt", "student_cnn", model)
    other = build_model("student_cnn", height=128, width=256, k=4)
    payload = load_weights(other, path, "student_cnn")
    assert payload["config"] == {"height": 64, "width": 128, "num_classes": 3, "k": 2}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)


def test_wrong_checkpoint_arch_is_one_line_naming_the_file(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "cnn.pt", "student_cnn", build_model("student_cnn", height=64, width=64, k=1))
    with pytest.raises(CheckpointError) as info:
        load_weights(build_model("student_vit", height=64, width=64, k=1), path, "student_vit")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "student_cnn" in message


def test_mislabelled_or_broken_checkpoints_are_one_line(tmp_path) -> None:
    cnn = build_model("student_cnn", height=64, width=64, k=1)
    state = cnn.state_dict()
    liar = tmp_path / "liar.pt"
    torch.save({"arch": "student_vit", "config": {}, "model": state}, liar)
    with pytest.raises(CheckpointError, match="do not fit") as info:
        load_weights(build_model("student_vit", height=64, width=64, k=1), liar, "student_vit")
    assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as info:
        load_weights(cnn, garbage, "student_cnn")
    assert "\n" not in str(info.value)
