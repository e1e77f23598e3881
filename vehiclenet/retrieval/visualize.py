"""Pictures of retrieval results: the query beside its top-k gallery matches.

Layout (all sizes in pixels, see :func:`ranking_layout`): a white canvas; the query tile on
the left, framed in blue; a gap with a grey divider; then the k matches left to right. Each
tile is a ``thumb`` x ``thumb`` thumbnail (aspect kept, centred on light grey) inside a
``BORDER``-wide frame: green when the match has the query's vehicle id, red when its id
differs, plain light grey when either id is unknown. Two lines of text under each tile:
rank and distance, then the id when known (Pillow's default font).
"""
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw, ImageFont

from ..errors import UsageError
from ..fileio import atomic_write

if TYPE_CHECKING:
    from .calibration import Calibration

__all__ = ["GREEN", "RED", "QUERY_BLUE", "NEUTRAL", "draw_calibration", "draw_ranking", "picture_format",
           "ranking_layout"]

MARGIN = 12
BORDER = 5
SPACING = 10
GAP = 28
TEXT_H = 30

GREEN = (0, 170, 60)
RED = (220, 30, 30)
QUERY_BLUE = (40, 90, 220)
NEUTRAL = (200, 200, 200)
_BACKGROUND = (255, 255, 255)
_THUMB_BG = (235, 235, 235)

Box = Tuple[int, int, int, int]


def ranking_layout(k: int, thumb: int = 128) -> Dict[str, object]:
    """Geometry of a ranking picture with ``k`` matches: canvas ``size`` (w, h) and the
    outer ``(left, top, right, bottom)`` frame boxes (right/bottom exclusive) of the
    ``query`` tile and of each match in ``matches``."""
    tile = thumb + 2 * BORDER
    width = 2 * MARGIN + tile + GAP + k * tile + max(0, k - 1) * SPACING
    height = 2 * MARGIN + tile + TEXT_H
    query = (MARGIN, MARGIN, MARGIN + tile, MARGIN + tile)
    x0 = MARGIN + tile + GAP
    matches = [(x0 + i * (tile + SPACING), MARGIN, x0 + i * (tile + SPACING) + tile, MARGIN + tile) for i in range(k)]
    return {"size": (width, height), "query": query, "matches": matches}


def _thumbnail(path: Optional[Union[str, os.PathLike]], thumb: int) -> Image.Image:
    canvas = Image.new("RGB", (thumb, thumb), _THUMB_BG)
    try:
        with Image.open(os.fspath(path)) as img:
            img = img.convert("RGB")
            scale = min(thumb / img.width, thumb / img.height)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.BICUBIC)
            canvas.paste(img, ((thumb - size[0]) // 2, (thumb - size[1]) // 2))
    except Exception:  # a moved or broken file must not stop the picture: show a placeholder
        draw = ImageDraw.Draw(canvas)
        draw.line([(0, 0), (thumb - 1, thumb - 1)], fill=(170, 170, 170), width=2)
        draw.line([(0, thumb - 1), (thumb - 1, 0)], fill=(170, 170, 170), width=2)
        draw.text((6, 6), "unreadable", fill=(90, 90, 90), font=ImageFont.load_default())
    return canvas


def _frame(draw: ImageDraw.ImageDraw, box: Box, colour: Tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    for i in range(BORDER):
        draw.rectangle([left + i, top + i, right - 1 - i, bottom - 1 - i], outline=colour)


def _label(draw: ImageDraw.ImageDraw, box: Box, lines: Sequence[str], font) -> None:
    left, _, right, bottom = box
    y = bottom + 3
    for line in lines:
        w = draw.textlength(line, font=font)
        draw.text((left + max(0, (right - left - w) / 2), y), line, fill=(20, 20, 20), font=font)
        y += 13


def draw_ranking(
    query_path: Union[str, os.PathLike],
    ranked_paths: Sequence[Union[str, os.PathLike]],
    distances: Sequence[float],
    out_path: Union[str, os.PathLike],
    *,
    query_id: Optional[int] = None,
    ids: Optional[Sequence[Optional[int]]] = None,
    thumb: int = 128,
) -> Path:
    """Draw the query beside its ranked matches and save the picture (format from the suffix).

    Args:
        query_path: the query image file.
        ranked_paths: the matches, best first.
        distances: one per match, printed under it.
        out_path: where to write (e.g. ``ranked.png``); folders are created.
        query_id, ids: vehicle ids when known (``None`` entries for unknown); a match is
            framed green when its id equals ``query_id``, red when it differs.
        thumb: thumbnail side in pixels.

    Returns:
        The path written.
    """
    if len(distances) != len(ranked_paths):
        raise ValueError(f"{len(ranked_paths)} paths but {len(distances)} distances")
    if ids is not None and len(ids) != len(ranked_paths):
        raise ValueError(f"{len(ranked_paths)} paths but {len(ids)} ids")
    fmt = picture_format(out_path)  # before any drawing: an unknown suffix is a usage error
    layout = ranking_layout(len(ranked_paths), thumb)
    canvas = Image.new("RGB", layout["size"], _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def place(path, box: Box, colour, lines: List[str]) -> None:
        canvas.paste(_thumbnail(path, thumb), (box[0] + BORDER, box[1] + BORDER))
        _frame(draw, box, colour)
        _label(draw, box, lines, font)

    qbox = layout["query"]
    place(query_path, qbox, QUERY_BLUE, ["query"] + ([f"id {query_id}"] if query_id is not None else []))
    divider_x = qbox[2] + GAP // 2
    draw.line([(divider_x, MARGIN), (divider_x, qbox[3] + TEXT_H - 4)], fill=(160, 160, 160), width=2)
    for i, (path, dist, box) in enumerate(zip(ranked_paths, distances, layout["matches"])):
        gid = None if ids is None else ids[i]
        if query_id is None or gid is None:
            colour = NEUTRAL
        else:
            colour = GREEN if gid == query_id else RED
        place(path, box, colour, [f"#{i + 1}  {float(dist):.3f}"] + ([f"id {gid}"] if gid is not None else []))

    out = Path(out_path)
    with atomic_write(out) as handle:  # a full disk must not leave a truncated picture under the name
        canvas.save(handle, format=fmt)
    return out


def picture_format(path: Union[str, os.PathLike]) -> str:
    """Pillow's format for the suffix of ``path`` (``.png`` -> ``PNG``); UsageError if it cannot write one."""
    Image.init()
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(f"{os.fspath(path)!r}: the picture's format comes from its suffix; "
                        "use .png or .jpg (Pillow cannot write this one)")
    return fmt


PLOT = 360  # side of each panel of a calibration picture


def draw_calibration(calibration: "Calibration", out: Union[str, os.PathLike]) -> Path:
    """A picture of a calibration: left, the histograms of same-vehicle (green) and
    different-vehicle (red) pair distances over [0, 2], each scaled to its own peak, with the
    threshold as a blue line; right, the ROC (TPR against log FPR), the threshold's point in blue."""
    fmt = picture_format(out)
    font = ImageFont.load_default()
    width, height = 3 * MARGIN + 2 * PLOT, 2 * MARGIN + PLOT + TEXT_H
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    left, top = MARGIN, MARGIN
    hist = calibration.histogram
    bins = len(hist["positives"])
    for counts, colour in ((hist["negatives"], RED), (hist["positives"], GREEN)):
        peak = max(max(counts), 1)
        points = [(left + PLOT * (i + 0.5) / bins, top + PLOT * (1 - c / peak)) for i, c in enumerate(counts)]
        draw.line(points, fill=colour, width=2)
    x = left + PLOT * calibration.distance / 2.0
    draw.line([(x, top), (x, top + PLOT)], fill=QUERY_BLUE, width=2)
    draw.rectangle([left, top, left + PLOT, top + PLOT], outline=NEUTRAL)
    draw.text((left, top + PLOT + 4), f"distance 0..2, threshold {calibration.distance:.4f}", fill=(20, 20, 20),
              font=font)
    _draw_roc(draw, calibration, 2 * MARGIN + PLOT, top, font)
    with atomic_write(out) as fh:
        canvas.save(fh, format=fmt)
    return Path(out)


def _draw_roc(draw: ImageDraw.ImageDraw, calibration: "Calibration", left: int, top: int, font) -> None:
    import math

    fpr, tpr = calibration.curve.get("fpr") or [1.0], calibration.curve.get("tpr") or [1.0]
    low = math.log10(min(fpr))
    span = max(-low, 1e-9)

    def at(f: float, t: float) -> Tuple[float, float]:
        return left + PLOT * (math.log10(max(f, 10 ** low)) - low) / span, top + PLOT * (1 - t)

    draw.rectangle([left, top, left + PLOT, top + PLOT], outline=NEUTRAL)
    draw.line([at(f, t) for f, t in zip(fpr, tpr)], fill=(20, 20, 20), width=2)
    x, y = at(max(calibration.measured_fmr, 10 ** low), calibration.tpr)
    draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=QUERY_BLUE)
    draw.text((left, top + PLOT + 4), f"ROC: TPR vs FPR 1e{low:.0f}..1; at threshold TPR {calibration.tpr:.4f}",
              fill=(20, 20, 20), font=font)
