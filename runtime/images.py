"""Decode and vet request images: data URLs, confined local files, refused remote URLs.

Everything that can go wrong with an image becomes an `InvalidRequest` (400) or
`PayloadTooLarge` (413); nothing here ever raises anything else for bad input.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from joulecap.runtime.errors import InvalidRequest, JoulecapError, PayloadTooLarge

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""Image formats accepted after decoding (by content, not by declared MIME type)."""


@dataclass(frozen=True)
class ImagePolicy:
    """Limits and permissions for request images.

    Attributes:
        max_pixels: Largest width x height accepted.
        allow_local_dir: Directory local paths are confined to; None refuses local paths.
        allow_remote: Whether http(s) URLs may be fetched.

    """

    max_pixels: int
    allow_local_dir: str | None = None
    allow_remote: bool = False


def decode_image_bytes(data: bytes, policy: ImagePolicy, param: str) -> Image.Image:
    """Decode encoded image bytes to RGB, enforcing the pixel limit and supported formats."""
    # No warnings.catch_warnings() here: it swaps process-wide filters and is not thread-safe,
    # and requests are decoded on worker threads. Our own limit is checked from the header right
    # after open(); PIL's DecompressionBombError (above 2x Image.MAX_IMAGE_PIXELS) is a backstop.
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        width, height = img.size
        if width * height > policy.max_pixels:
            raise PayloadTooLarge(
                f"Image is {width}x{height} = {width * height} pixels; the limit is "
                f"{policy.max_pixels} (server option --max-image-pixels).",
                param=param,
                code="image_too_large",
            )
        if fmt not in SUPPORTED_FORMATS:
            raise InvalidRequest(
                f"Unsupported image format {fmt!r}; use one of {', '.join(SUPPORTED_FORMATS)}.",
                param=param,
                code="unsupported_image",
            )
        img.load()
        return img.convert("RGB")
    except JoulecapError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise PayloadTooLarge(f"Image rejected as a decompression bomb: {exc}", param=param) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest(
            "Image could not be decoded (corrupt or not an image).", param=param, code="invalid_image"
        ) from exc
    except Exception as exc:
        # PIL's format plugins raise many other types on hostile bytes (struct.error, IndexError,
        # TypeError, ZeroDivisionError, ...); every one of them is the client's bad image, not a 500.
        raise InvalidRequest(
            "Image could not be decoded (corrupt or not an image).", param=param, code="invalid_image"
        ) from exc


def _decode_data_url(url: str, policy: ImagePolicy, param: str) -> Image.Image:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise InvalidRequest(
            "Image data URLs must look like data:image/png;base64,<data>.", param=param, code="invalid_image"
        )
    # Guard the decoded size before decoding: base64 expands 3 bytes into 4 characters.
    if len(payload) * 3 // 4 > policy.max_pixels * 4 + 1024:
        raise PayloadTooLarge("Image data is larger than the pixel limit allows.", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(
            "Image data URL is not valid base64.", param=param, code="invalid_image"
        ) from exc
    return decode_image_bytes(data, policy, param)


def _read_local(path_text: str, policy: ImagePolicy, param: str) -> Image.Image:
    if policy.allow_local_dir is None:
        raise InvalidRequest(
            "Local image paths are disabled; start the server with --allow-local-files DIR.",
            param=param,
            code="local_files_disabled",
        )
    try:
        root = Path(policy.allow_local_dir).resolve()
        # resolve() follows symlinks, so a link inside DIR that points outside it is refused too.
        target = (root / path_text).resolve()  # an absolute path_text replaces root here
        inside = target.is_relative_to(root)
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops, over-long names
        raise InvalidRequest("Image path is not a valid path.", param=param, code="path_not_allowed") from exc
    if not inside:
        raise InvalidRequest(
            "Image path is outside the allowed directory.", param=param, code="path_not_allowed"
        )
    try:
        if not target.is_file():
            raise InvalidRequest(
                "Image file not found in the allowed directory.", param=param, code="not_found"
            )
        if target.stat().st_size > policy.max_pixels * 4 + 1024:
            raise PayloadTooLarge("Image file is larger than the pixel limit allows.", param=param)
        # O_NOFOLLOW: a symlink swapped in after resolve() is refused instead of followed.
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            data = f.read(policy.max_pixels * 4 + 1025)
    except OSError as exc:  # unreadable (permissions, a directory race): the client's problem to fix
        raise InvalidRequest(
            "Image file could not be read in the allowed directory.", param=param, code="not_found"
        ) from exc
    return decode_image_bytes(data, policy, param)


REMOTE_TIMEOUT_S = 10.0
"""Longest a remote image fetch may take."""


def _fetch_remote(url: str, policy: ImagePolicy, param: str) -> Image.Image:
    limit = policy.max_pixels * 4 + 1024
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as resp:
            data = resp.read(limit + 1)
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"Remote image could not be fetched: {exc}", param=param) from exc
    if len(data) > limit:
        raise PayloadTooLarge("Remote image is larger than the pixel limit allows.", param=param)
    return decode_image_bytes(data, policy, param)


def load_image(url: str, policy: ImagePolicy, *, param: str = "messages") -> Image.Image:
    """Turn an `image_url.url` value into an RGB image, enforcing `policy`.

    Args:
        url: `data:` URL, `file://` URL or plain path (local files), or http(s) URL.
        policy: Limits and permissions.
        param: Name of the offending request field, for error bodies.

    Raises:
        InvalidRequest: Unreadable, unsupported, disallowed or missing image.
        PayloadTooLarge: Image over the pixel limit or a decompression bomb.

    """
    if not isinstance(url, str) or not url:
        raise InvalidRequest("image_url.url must be a non-empty string.", param=param)
    if url.startswith("data:"):
        return _decode_data_url(url, policy, param)
    try:
        parsed = urlparse(url)
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket
        raise InvalidRequest("image_url.url is not a valid URL.", param=param, code="invalid_image") from exc
    if parsed.scheme in ("http", "https"):
        if not policy.allow_remote:
            raise InvalidRequest(
                "Remote image URLs are refused; send the image as a base64 data URL "
                "(or start the server with --allow-remote-images).",
                param=param,
                code="remote_images_disabled",
            )
        return _fetch_remote(url, policy, param)
    if parsed.scheme == "file":
        return _read_local(unquote(parsed.path), policy, param)
    if parsed.scheme == "":
        return _read_local(url, policy, param)
    raise InvalidRequest(f"Unsupported image URL scheme {parsed.scheme!r}.", param=param)
