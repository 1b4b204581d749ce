"""Images and audio in chat requests: the wire parts, their decoding and limits, the URL policy.

- :mod:`edgert.media.parts`: OpenAI's ``image_url`` / ``input_audio`` content parts and
  :data:`MEDIA_MARKER`, the text that stands for each medium in a rendered prompt.
- :mod:`edgert.media.inputs`: :func:`collect_media` turns a request's parts into :class:`MediaInput`
  (decoded RGB images, checked audio files) under :class:`MediaLimits`; every refusal names the part.
- :mod:`edgert.media.audio`: WAV / MP3 checks and lengths. :mod:`edgert.media.remote`: which image
  URLs may be fetched (none unless ``serve.media_url_hosts`` names the host) and the bounded fetch.

This package never imports ``edgert.api`` (which imports it) nor ``llama_cpp``; libmtmd is driven by
the engine, which takes :class:`MediaInput` as it is.
"""

from edgert.media.inputs import MediaInput, MediaLimits, collect_media, decode_image
from edgert.media.parts import MEDIA_MARKER, ImageUrl, ImageUrlPart, InputAudio, InputAudioPart

__all__ = [
    "MEDIA_MARKER",
    "ImageUrl",
    "ImageUrlPart",
    "InputAudio",
    "InputAudioPart",
    "MediaInput",
    "MediaLimits",
    "collect_media",
    "decode_image",
]
