"""The pixels a shard set gives the trainer, in one definition each:

- `decode_jpeg(jpg)`: a shard's JPEG as DALI's CPU decoder decodes it (libjpeg-turbo with the
  accurate integer DCT and fancy chroma upsampling, libjpeg's defaults: bit for bit, tests
  hold the two equal). Every CPU reader of the shards calls it: the webdataset input back-end
  (trainer.wds_loader), the fc7 index and Figure 4 (trainer.retrieval), the tests' oracles.
- `as_sharded(image bytes)`: what the trainer would have seen for any image: the sharder's
  `prepare_image` (contract 3), the JPEG at the shard set's quality, decoded as above.
  Serving calls it, so that its inputs carry the same JPEG round trip as the training data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import simplejpeg

from pipeline.preprocess import OUTPUT_SIZE, encode_jpeg, prepare_image


def decode_jpeg(jpg: bytes) -> np.ndarray:
    """A shard's JPEG -> RGB uint8 HWC, exactly as DALI's CPU decoder gives it."""
    return simplejpeg.decode_jpeg(jpg, colorspace="RGB", fastdct=False, fastupsample=False)


def as_sharded(data: bytes, *, quality: int, size: int = OUTPUT_SIZE, **prepare_kwargs: Any) -> np.ndarray:
    """Any image's bytes -> the size x size RGB pixels the trainer would have read for it from
    a shard set written at JPEG `quality` (ImageError for unusable input)."""
    pixels = prepare_image(data, size=size, **prepare_kwargs).pixels
    return decode_jpeg(encode_jpeg(pixels, quality))
