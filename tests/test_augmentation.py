"""The reference training augmentation (IRN's long-side rescale, flip, crop): seeded per (seed, epoch, index)."""

import pytest
import torch

from pole_hf.augmentation import ScaleFlipCrop


def image(height=40, width=60):
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))


def test_reference_values_and_their_synthetic_scaling():
    assert (ScaleFlipCrop().long_side, ScaleFlipCrop().flip, ScaleFlipCrop().crop_size) == ((320, 640), True, 512)
    small = ScaleFlipCrop.scaled_for(128)
    assert (small.long_side, small.crop_size) == ((80, 160), 128)


def test_same_seed_epoch_and_index_give_the_same_pixels_whatever_came_before():
    augment = ScaleFlipCrop.scaled_for(64, seed=3)
    first = augment(image(), epoch=1, index=5)
    augment(image(), epoch=0, index=2)  # no shared state between calls
    torch.testing.assert_close(ScaleFlipCrop.scaled_for(64, seed=3)(image(), epoch=1, index=5), first, rtol=0,
                               atol=0)
    assert first.shape == (3, 64, 64)
    others = [augment(image(), epoch=e, index=i) for e, i in ((2, 5), (1, 6))]
    assert all(not torch.equal(first, other) for other in others)
    assert not torch.equal(ScaleFlipCrop.scaled_for(64, seed=4)(image(), epoch=1, index=5), first)


def test_flip_only_flips_and_a_small_image_is_padded_with_the_fill():
    flip = ScaleFlipCrop(long_side=None, crop_size=None)
    seen = {torch.equal(flip(image(), 0, i), image().flip(-1)) or 2 * torch.equal(flip(image(), 0, i), image())
            for i in range(12)}
    assert seen == {True, 2}, "over 12 images some must be flipped and some not"
    pad = ScaleFlipCrop(long_side=None, flip=False, crop_size=80, fill=(0.1, 0.2, 0.3))(image(), 0, 0)
    assert pad.shape == (3, 80, 80)
    filled = (pad == torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)).all(0)
    assert int((~filled).sum()) == 40 * 60  # every image pixel is kept once, the rest is the fill


def test_rescale_hits_the_drawn_long_side():
    augment = ScaleFlipCrop(long_side=(30, 90), crop_size=None, flip=False)
    sides = {max(augment(image(), 0, i).shape[-2:]) for i in range(20)}
    assert len(sides) > 1 and min(sides) >= 30 and max(sides) <= 90


@pytest.mark.parametrize("options", [{"long_side": (50, 20)}, {"crop_size": 0}, {"fill": (0.5,)}])
def test_bad_values_are_refused(options):
    with pytest.raises(ValueError, match="must"):
        ScaleFlipCrop(**options)


def test_pixel_dataset_items_depend_on_epoch_and_index_only():
    from pole_hf.data import load_synthetic
    from pole_hf.training import PixelDataset

    data = load_synthetic(num_images=3, seed=0, image_size=48)
    make = lambda: PixelDataset(data, (48, 48), augment=ScaleFlipCrop.scaled_for(48))
    one, two = make(), make()
    one.set_epoch(2)
    two.set_epoch(2)
    forward = [one[i][0] for i in range(3)]
    backward = [two[i][0] for i in reversed(range(3))][::-1]
    for a, b in zip(forward, backward):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    two.set_epoch(3)
    assert not all(torch.equal(a, two[i][0]) for i, a in enumerate(forward))
