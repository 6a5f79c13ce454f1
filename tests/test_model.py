"""The drop-in contract: state_dict keys, checkpoints, options beyond the official code, and
clear errors for bad input."""
import os
import pickle

import pytest
import torch

import mae_fast
from mae_fast import reference
from mae_fast.pos_embed import get_2d_sincos_pos_embed
from _official import FIXTURES, build_model, load_run

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def _official_key_list():
    rows = [line.split("\t") for line in open(os.path.join(FIXTURES, "official_mae_vit_base_patch16_state_dict.txt")).read().splitlines() if line]
    return {k: (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), kind) for k, shape, kind in rows}


def test_state_dict_equals_official_list():
    official = _official_key_list()
    assert len(official) == 254
    model = mae_fast.mae_vit_base_patch16()
    sd = model.state_dict()
    assert list(sd) == list(official)  # same keys, same order
    for k, (shape, _) in official.items():
        assert tuple(sd[k].shape) == shape, k
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {k for k, (_, kind) in official.items() if kind == "frozen"}


@pytest.mark.parametrize("factory,patch,dim,depth", [
    (mae_fast.mae_vit_large_patch16, 16, 1024, 24), (mae_fast.mae_vit_huge_patch14, 14, 1280, 32),
    (mae_fast.mae_vit_base_patch16_dec512d8b, 16, 768, 12)])
def test_factories(factory, patch, dim, depth):
    with torch.device("meta"):
        model = factory()
    assert model.patch_size == patch and model.cls_token.shape[-1] == dim and len(model.blocks) == depth
    assert model.blocks[0].norm1.eps == 1e-6 and len(model.decoder_blocks) == 8


def test_official_checkpoint_round_trip(tmp_path):
    run, config, params, _ = load_run("official_mae_tiny_pix.pt")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": params, "epoch": 3}, path)  # the official file layout
    model = build_model(config).double()
    report = mae_fast.load_official_checkpoint(model, path)
    assert not report.missing_keys and not report.unexpected_keys and not report.interpolated
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    loss, _, _ = model(run["imgs"], mask_ratio=config["mask_ratio"], noise=run["noise"])
    torch.testing.assert_close(loss, run["loss"], rtol=1e-10, atol=0)
    # and back: our state_dict saved the official way loads into a fresh model unchanged
    torch.save({"model": model.state_dict()}, path)
    again = build_model(config).double()
    mae_fast.load_official_checkpoint(again, path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_encoder_only_checkpoint_is_reported_not_silently_used(tmp_path):
    _, config, params, _ = load_run("official_mae_tiny_pix.pt")
    encoder_only = {k: v for k, v in params.items() if not k.startswith(("decoder_", "mask_token"))}
    model = build_model(config).double()
    with pytest.raises(ValueError, match="encoder-only"):
        mae_fast.load_official_checkpoint(model, {"model": encoder_only})
    with pytest.warns(UserWarning, match="decoder keeps its random init"):
        report = mae_fast.load_official_checkpoint(model, {"model": encoder_only}, strict_decoder=False)
    assert report.encoder_only and "decoder_pred.weight" in report.missing_keys
    assert torch.equal(model.patch_embed.proj.weight, params["patch_embed.proj.weight"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": _Evil()}}, f, protocol=2)
    with pytest.raises(ValueError, match="weights-only"):
        mae_fast.load_official_checkpoint(mae_fast.MaskedAutoencoderViT(**TINY), path)


def test_checkpoint_shape_mismatch_names_the_key():
    model = mae_fast.MaskedAutoencoderViT(**TINY)
    sd = model.state_dict()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight"):
        mae_fast.load_official_checkpoint(mae_fast.MaskedAutoencoderViT(**TINY), {"model": sd})


def test_checkpoint_of_another_size_interpolates_positions():
    small = mae_fast.MaskedAutoencoderViT(**TINY)  # 4x4 grid
    big = mae_fast.MaskedAutoencoderViT(**{**TINY, "img_size": 48})  # 6x6 grid
    report = mae_fast.load_official_checkpoint(big, {"model": small.state_dict()})
    assert report.interpolated == ["pos_embed", "decoder_pos_embed"]
    assert big.pos_embed.shape == (1, 37, 32)
    assert torch.equal(big.pos_embed[:, 0], small.pos_embed[:, 0])  # cls row kept
    # bicubic resize of a smooth table stays close to the table of the new grid
    torch.testing.assert_close(big.pos_embed[0, 1:].reshape(6, 6, 32)[0, 0],
                               small.pos_embed[0, 1:].reshape(4, 4, 32)[0, 0], atol=0.3, rtol=0)
    big(torch.randn(2, 3, 48, 48))  # and it runs


def test_noise_argument_equals_official_rand_draw(device):
    model = mae_fast.MaskedAutoencoderViT(**TINY)
    imgs = torch.randn(3, 3, 32, 32)
    torch.manual_seed(7)
    loss_a, pred_a, mask_a = model(imgs, mask_ratio=0.75)
    torch.manual_seed(7)
    noise = torch.rand(3, 16)
    loss_b, pred_b, mask_b = model(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask_a, mask_b) and torch.equal(pred_a, pred_b) and torch.equal(loss_a, loss_b)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_other_than_three(in_chans, device):
    model = mae_fast.MaskedAutoencoderViT(**TINY, in_chans=in_chans).double()
    imgs = torch.randn(2, in_chans, 32, 32, dtype=torch.float64)
    x = model.patchify(imgs)
    assert x.shape == (2, 16, 8 * 8 * in_chans)
    assert torch.equal(model.unpatchify(x), imgs)
    # element order (h, w, p, q, c), written out by hand
    assert x[1, 4 * 2 + 3, (5 * 8 + 6) * in_chans + (in_chans - 1)] == imgs[1, in_chans - 1, 2 * 8 + 5, 3 * 8 + 6]
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 16, 64 * in_chans) and torch.isfinite(loss)
    loss.backward()


def test_non_square_images(device):
    model = mae_fast.MaskedAutoencoderViT(**{**TINY, "img_size": (32, 48)}).double()
    assert model.patch_embed.grid_size == (4, 6) and model.pos_embed.shape == (1, 25, 32)
    imgs = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 24, 192) and mask.shape == (2, 24)
    loss.backward()


def test_non_square_table_agrees_with_the_official_square_table():
    # row (i, j) of a (4, 6) grid must encode the same (i, j) as the official 6x6 table
    rect = get_2d_sincos_pos_embed(32, (4, 6))
    square = get_2d_sincos_pos_embed(32, 6)
    for i in range(4):
        for j in range(6):
            assert (rect[i * 6 + j] == square[i * 6 + j]).all()


def test_reference_backend_runs_math_attention_everywhere():
    model = mae_fast.MaskedAutoencoderViT(**TINY, backend="reference")
    assert {c.impl for c in model.backend_choices("cpu").values()} == {"reference", "math"}


BAD = [
    (lambda m: m(torch.randn(2, 3, 32, 40)), ValueError, "does not match img_size"),
    (lambda m: m(torch.randn(2, 3, 30, 32)), ValueError, "not a multiple of the patch size 8"),
    (lambda m: m(torch.randn(2, 1, 32, 32)), ValueError, "1 channels.*in_chans=3"),
    (lambda m: m(torch.randn(2, 3, 32)), ValueError, r"\(N, C, H, W\)"),
    (lambda m: m(torch.randint(0, 255, (2, 3, 32, 32))), TypeError, "floating-point"),
    (lambda m: m(torch.randn(2, 3, 32, 32, dtype=torch.float64)), TypeError, "dtype"),
    (lambda m: m(torch.randn(2, 3, 32, 32), mask_ratio=1.0), ValueError, r"\[0, 1\)"),
    (lambda m: m(torch.randn(2, 3, 32, 32), mask_ratio=-0.1), ValueError, r"\[0, 1\)"),
    (lambda m: m(torch.randn(2, 3, 32, 32), mask_ratio=0.97), ValueError, "keeps no patch"),
    (lambda m: m(torch.randn(2, 3, 32, 32), mask_ratio="0.5"), TypeError, "mask_ratio"),
    (lambda m: m(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15)), ValueError, r"noise must have shape"),
    (lambda m: m(torch.randn(2, 3, 32, 32), noise=torch.arange(32).view(2, 16)), TypeError, "noise must be floating"),
    (lambda m: m(torch.randn(2, 3, 32, 32), noise=[0.5] * 16), TypeError, "noise must be a torch.Tensor"),
    (lambda m: m.unpatchify(torch.randn(2, 15, 192)), ValueError, "unpatchify expects"),
    (lambda m: mae_fast.MaskedAutoencoderViT(**TINY, backend="gpu"), ValueError, "backend must be one of"),
    (lambda m: mae_fast.MaskedAutoencoderViT(**{**TINY, "img_size": 30}), ValueError, "not a multiple of patch_size"),
    (lambda m: mae_fast.MaskedAutoencoderViT(**{**TINY, "num_heads": 3}), ValueError, "not divisible by num_heads"),
    (lambda m: mae_fast.MaskedAutoencoderViT(**{**TINY, "embed_dim": 34, "num_heads": 2}), ValueError, "embed_dim % 4"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[b[2] for b in BAD])
def test_bad_input_gives_a_clear_error(call, exc, match):
    model = mae_fast.MaskedAutoencoderViT(**TINY)
    with pytest.raises(exc, match=match):
        call(model)


def test_reference_masking_follows_official_definition():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ids_keep, ids_restore, mask = reference.masking_indices(noise, 2)
    assert ids_keep.tolist() == [[1, 3]]  # the two smallest noises are kept
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert ids_restore.tolist() == [[3, 0, 2, 1]]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_whole_model_compiles_fullgraph(backend, device):
    model = mae_fast.MaskedAutoencoderViT(**TINY, backend=backend)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    loss, pred, mask = model(imgs, 0.75, noise)
    loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    c_loss, c_pred, c_mask = compiled(imgs, 0.75, noise)
    c_loss.backward()
    torch.testing.assert_close(c_loss, loss)
    torch.testing.assert_close(c_pred, pred)
    assert torch.equal(c_mask, mask)
    for n, g in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, msg=n)


def test_a_subclass_that_overrides_random_masking_is_honoured():
    class KeepFirst(mae_fast.MaskedAutoencoderViT):
        calls = 0

        def random_masking(self, x, mask_ratio):  # the official signature, no noise
            KeepFirst.calls += 1
            N, L, D = x.shape
            noise = torch.arange(L, dtype=torch.float32).expand(N, L)  # keep the first patches
            return super().random_masking(x, mask_ratio, noise)

    model = KeepFirst(**TINY)
    loss, pred, mask = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
    assert KeepFirst.calls == 1
    assert mask.tolist() == [[0.0] * 4 + [1.0] * 12] * 2


def test_hooks_on_patch_embed_and_a_custom_patchify_are_honoured():
    model = mae_fast.MaskedAutoencoderViT(**TINY).double()
    imgs, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16)
    plain = model(imgs, 0.75, noise)
    seen = []
    handle = model.patch_embed.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked = model(imgs, 0.75, noise)
    handle.remove()
    assert seen == [(2, 16, 32)]  # the hook saw every patch, as in the official order
    torch.testing.assert_close(hooked[0], plain[0], rtol=1e-12, atol=0)
    assert torch.equal(hooked[2], plain[2])

    class FlippedTarget(mae_fast.MaskedAutoencoderViT):
        def patchify(self, imgs):
            return super().patchify(imgs.flip(-1))

    flipped = FlippedTarget(**TINY).double()
    flipped.load_state_dict(model.state_dict())
    loss, pred, mask = flipped(imgs, 0.75, noise)
    want = reference.masked_loss(imgs.flip(-1), pred, mask, 8, False)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert not torch.allclose(loss, plain[0])
