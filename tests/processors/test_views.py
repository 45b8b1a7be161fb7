"""Image view operations (processors/views.py), on PIL images alone: each operation's effect,
regions in both coordinate systems and carried through cuts, bad boxes naming the example,
random operations deterministic given the seed and left out without one."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageChops, ImageStat

from opsd_mm.config.sections import ViewOpConfig
from opsd_mm.processors import views
from opsd_mm.types import BadImageError, Example, Region


def op(name: str, **kw) -> ViewOpConfig:
    return ViewOpConfig(op=name, **kw)


def checker(w: int = 120, h: int = 80, cell: int = 10) -> Image.Image:
    """A two-colour checkerboard with a solid blue block at x 60-90, y 20-50 (the region)."""
    img = Image.new("RGB", (w, h), (255, 255, 255))
    for y in range(0, h, cell):
        for x in range(0, w, cell):
            if (x // cell + y // cell) % 2:
                img.paste((200, 30, 30), (x, y, x + cell, y + cell))
    img.paste((20, 40, 220), (60, 20, 90, 50))
    return img


BOX_PX = (60, 20, 90, 50)
BOX_NORM = (0.5, 0.25, 0.75, 0.625)
BLOCK = (Region(0, BOX_PX),)  # the blue block, in pixels


def example(regions=(), images=None) -> Example:
    return Example(id="ex-7", question="?", images=images or (checker(),), regions=regions)


def run(ops, regions=BLOCK, seed=None, max_pixels=10_000) -> list[Image.Image]:
    ex = example(regions)
    (group,) = views.view_images(ex, list(ex.images), ops, seed, max_pixels)
    return group


# ----------------------------------------------------------------------------- regions


def test_pixel_and_normalized_boxes_are_the_same_region():
    pixel = views.region_boxes(example((Region(0, BOX_PX),)), [(120, 80)])
    norm = views.region_boxes(example((Region(0, BOX_NORM, normalized=True),)), [(120, 80)])
    assert pixel == norm == [[BOX_NORM]]
    a = run([op("crop")], regions=(Region(0, BOX_PX),))
    b = run([op("crop")], regions=(Region(0, BOX_NORM, normalized=True),))
    assert a[0].tobytes() == b[0].tobytes() and a[0].size == (30, 30)


@pytest.mark.parametrize(
    "region, reason",
    [
        (Region(0, (60, 20, 130, 50)), "outside the image"),
        (Region(0, (-1, 20, 90, 50)), "outside the image"),
        (Region(0, (0.5, 0.2, 1.2, 0.6), normalized=True), "outside the image"),
        (Region(0, (60, 20, 60, 50)), "empty box"),
        (Region(0, (90, 20, 60, 50)), "empty box"),
        (Region(0, (0.3, 0.5, 0.4, 0.5), normalized=True), "empty box"),
        (Region(1, BOX_PX), "no image 2"),
    ],
)
def test_bad_boxes_name_the_example_and_region(region, reason):
    with pytest.raises(
        BadImageError, match=f"ex-7.*region 1 \\(image {region.image + 1}\\).*{reason}"
    ):
        views.region_boxes(example((region,)), [(120, 80)])
    with pytest.raises(BadImageError, match="ex-7"):  # also when a view reads them
        run([op("zoom")], regions=(region,))


def test_region_checked_only_when_a_view_reads_it():
    bad = (Region(0, (60, 20, 500, 50)),)
    assert run([op("blur")], regions=bad)[0].size == (120, 80)


# ----------------------------------------------------------------------------- cuts and marks


def test_crop_replace_and_extra_with_margin():
    (cut,) = run([op("crop", margin=0.5)])
    assert cut.size == (60, 60)  # 30 + 15 on each side
    whole, extra = run([op("crop", placement="extra")])
    assert whole.tobytes() == checker().tobytes() and extra.size == (30, 30)
    assert ImageStat.Stat(extra).mean == pytest.approx([20, 40, 220])  # the blue block only
    # An image without a region is left as it is.
    (same,) = run([op("crop"), op("zoom", placement="extra")], regions=())
    assert same.tobytes() == checker().tobytes()


def test_zoom_resizes_the_cut_to_its_pixel_budget():
    (zoomed,) = run([op("zoom", pixels=3600)])
    assert zoomed.size == (60, 60)
    (default,) = run([op("zoom")], max_pixels=8100)  # the role's max_pixels
    assert default.size == (90, 90)
    # Several boxes: their union, with the boxes kept for a later mark.
    two = (Region(0, (0, 0, 10, 10)), Region(0, (30, 30, 40, 40)))
    (union,) = run([op("crop")], regions=two)
    assert union.size == (40, 40)
    (marked,) = run([op("crop"), op("mark", color="#00ff00", width=1)], regions=two)
    assert marked.getpixel((30, 30)) == (0, 255, 0) and marked.getpixel((35, 35)) != (0, 255, 0)


def test_mark_box_and_dim():
    (boxed,) = run([op("mark", width=2)])
    src = checker()
    diff = ImageChops.difference(boxed, src).getbbox()
    assert diff == (60, 20, 90, 50)  # only the outline, inside the box
    assert boxed.getpixel((60, 35)) == (255, 0, 0) and boxed.getpixel((75, 35)) == (20, 40, 220)
    (dimmed,) = run([op("mark", style="dim")])
    assert dimmed.getpixel((75, 35)) == (20, 40, 220)  # inside: unchanged
    assert sum(dimmed.getpixel((5, 5))) < sum(src.getpixel((5, 5))) * 0.5  # outside: darker
    assert src.tobytes() == checker().tobytes()  # the source is never drawn on


def test_marks_follow_the_region_through_a_random_crop():
    ops = [op("random_crop", scale=0.6), op("mark", color="#00ff00", width=1)]
    img = run(ops, seed=3)[0]
    rng = random.Random("3|0")  # what the view draws for image 0
    cw, ch = round(120 * rng.uniform(0.6, 1)), round(80 * rng.uniform(0.6, 1))
    left, top = rng.randint(0, 120 - cw), rng.randint(0, 80 - ch)
    assert img.size == (cw, ch)
    x0, y0 = max(0, 60 - left), max(0, 20 - top)
    assert img.getpixel((x0, y0)) == (0, 255, 0)


# ----------------------------------------------------------------------------- degradations


def test_degradations_keep_the_size_and_lose_detail():
    src = checker()
    (down,) = run([op("downscale", factor=0.1)])
    assert down.size == src.size and down.tobytes() != src.tobytes()
    assert len(set(down.getdata())) < len(set(src.getdata())) + 10
    assert down.getpixel((0, 0)) == down.getpixel((9, 9))  # nearest-neighbour blocks
    (jpeg,) = run([op("jpeg", quality=5)])
    assert jpeg.size == src.size and jpeg.tobytes() != src.tobytes()
    (blur,) = run([op("blur", radius=3)])
    edge = ImageStat.Stat(ImageChops.difference(blur, src)).mean
    assert blur.size == src.size and sum(edge) > 10
    (gray,) = run([op("grayscale")])
    r, g, b = gray.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()


def test_degradations_are_deterministic():
    for ops in ([op("jpeg", quality=20)], [op("blur")], [op("downscale")], [op("grayscale")]):
        assert run(ops)[0].tobytes() == run(ops)[0].tobytes()


# ----------------------------------------------------------------------------- randomness


def test_random_operations_follow_the_seed():
    ops = [op("random_crop", scale=0.5), op("blur", p=0.5), op("grayscale", p=0.5)]
    a, b = run(ops, seed=11)[0], run(ops, seed=11)[0]
    assert a.size == b.size and a.tobytes() == b.tobytes()
    outcomes = {(im.size, im.tobytes()) for im in (run(ops, seed=s)[0] for s in range(12))}
    assert len(outcomes) > 6  # other seeds, other pixels
    # Without a seed (evaluation, the teacher) the random operations are left out.
    assert run(ops)[0].tobytes() == checker().tobytes()
    # p = 1 is not random: it applies without a seed too.
    assert run([op("grayscale", p=1.0)])[0].tobytes() == run([op("grayscale")])[0].tobytes()


def test_p_applies_as_often_as_it_says():
    hits = sum(
        run([op("grayscale", p=0.3)], seed=s)[0].tobytes() != checker().tobytes()
        for s in range(200)
    )
    assert 35 <= hits <= 85  # binomial(200, 0.3): mean 60, sd 6.5


def test_each_image_draws_its_own_numbers():
    """Image i's view depends on (seed, i), not on the other images of the example."""
    ops = [op("random_crop", scale=0.5)]
    one = views.view_images(example(images=(checker(),)), [checker()], ops, 5, 10_000)
    two = views.view_images(
        example(images=(checker(), checker(60, 60))), [checker(), checker(60, 60)], ops, 5, 10_000
    )
    assert one[0][0].tobytes() == two[0][0].tobytes()


# ----------------------------------------------------------------------------- the rest


def test_resolution_sets_the_bounds_only():
    ops = [op("resolution", min_pixels=100, max_pixels=5000)]
    assert views.bounds(ops, 1, 10) == (100, 5000)
    assert views.bounds([op("resolution", max_pixels=5000)], 64, 10) == (64, 5000)
    assert views.bounds([op("resolution", max_pixels=784)], 3136, 50176) == (784, 784)
    assert views.bounds([], 64, 128) == (64, 128)
    assert run(ops)[0].tobytes() == checker().tobytes()


def test_describe():
    ops = [op("zoom", margin=0.1, placement="extra"), op("mark")]
    assert views.describe(ops) == "zoom(margin=0.1, placement=extra), mark"
    assert views.describe([]) == "(as given)"


def test_a_thin_cut_is_a_bad_image():
    """Qwen's resize rejects a side over 200x the other: a cut that thin is a bad image."""
    img = checker(300, 80)
    ex = example((Region(0, (0, 0, 300, 1)),), images=(img,))
    with pytest.raises(BadImageError, match="ex-7.*300x1, over 200:1"):
        views.view_images(ex, [img], [op("crop")], None, 10_000)
