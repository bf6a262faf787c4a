"""Pictures and text of detections: each box drawn on its image with its class name and score.

Detections here are what the serving signature returns for one image (`export.py`): boxes "yxyx" in the
image's pixels, scores, class names. Drawing needs Pillow (the `transfer` extra), imported when used.
"""

import io

import numpy as np

# Distinct colours, one per class id (cycled): the 10 of matplotlib's "tab10".
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # fmt: skip


def keep(detections, min_score):
    """The detections of one image with score >= `min_score`, as a list of (box, score, id, name)."""
    rows = []
    for box, score, class_id, name in zip(detections["boxes"], detections["scores"], detections["class_ids"],
                                          detections["class_names"], strict=True):
        if class_id >= 0 and score >= min_score:
            rows.append((np.asarray(box, float), float(score), int(class_id),
                         name.decode() if isinstance(name, bytes) else str(name)))
    return rows


def draw_detections(encoded, rows, image_format="PNG"):
    """The image file `encoded` with `rows` (from `keep`) drawn on it, as PNG or JPEG bytes."""
    from PIL import Image, ImageDraw

    image = Image.open(io.BytesIO(encoded)).convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(1, round(max(image.size) / 200))
    for box, score, class_id, name in rows:
        # A box clipped to the image can be empty (a prediction beyond the bottom edge: y_min = y_max = H):
        # drawn as a line. The right and bottom edges are the last pixels inside the box.
        y0, x0, y1, x1 = min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])
        colour = PALETTE[class_id % len(PALETTE)]
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
        label = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), label)
        text_y = y0 - (bottom - top) - 2 if y0 >= bottom - top + 2 else y0  # above the box when it fits
        draw.rectangle([x0, text_y, x0 + right - left + 2, text_y + bottom - top + 2], fill=colour)
        draw.text((x0 + 1, text_y - (top - y0)), label, fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


def format_detections(path, rows):
    """Printed lines for one image: its path, then `  name  score  [y_min, x_min, y_max, x_max]` per box."""
    lines = [f"{path}  ({len(rows)} detection{'s' if len(rows) != 1 else ''})"]
    width = max((len(name) for *_, name in rows), default=0)
    for box, score, _, name in rows:
        coords = ", ".join(f"{v:.1f}" for v in box)
        lines.append(f"  {name:<{width}}  {score:.3f}  yxyx [{coords}]")
    return "\n".join(lines)
