"""Offline Spanish speech synthesis with espeak-ng, loaded through ctypes from the ``espeakng-loader`` wheel.

No system package is needed: the wheel ships ``libespeak-ng.so`` and its voice data. espeak-ng carries
hidden state from one utterance to the next (the same sentence comes out different after other sentences,
and re-initialising does not reset it), and some voices draw random numbers seeded from the clock. So
:func:`say` synthesizes every utterance in a freshly forked child, which starts from the library's
pristine state, and seeds the generator: the output depends only on the arguments, not on the process or
on the order in which clips are made.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from emotune.errors import EmotuneError

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # synthesize in the calling thread and hand samples to our callback
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM = {"rate": 1, "volume": 2, "pitch": 3, "range": 4}
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """One espeak-ng instance. ``say`` returns float32 samples in [-1, 1] at ``sample_rate`` (22050 Hz)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader

            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_path = espeakng_loader.get_data_path()
        except (ImportError, OSError) as exc:
            raise EmotuneError(
                f"espeak-ng is not available ({exc}). The demo corpus needs it: `pip install espeakng-loader`."
            ) from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_path).encode(), 0)
        if self.sample_rate <= 0:
            raise EmotuneError(f"espeak-ng failed to start with its data folder {data_path}.")
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # keep a reference: ctypes does not
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None

    def seed(self, value: int) -> None:
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(value))

    def _collect(self, samples, n, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(n,)).copy())
        return 0

    def say(self, text: str, voice: str = "es", rate: int = 170, pitch: int = 50, pitch_range: int = 50,
            volume: int = 100) -> np.ndarray:
        """Synthesize ``text``; rate in words per minute (80-450), pitch and range 0-99, volume 0-200."""
        if voice != self._voice:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise EmotuneError(f"espeak-ng has no voice '{voice}'. Try 'es', 'es+f3' or 'es+m3'.")
            self._voice = voice
        for name, value, low, high in (("rate", rate, 80, 450), ("pitch", pitch, 0, 99),
                                       ("range", pitch_range, 0, 99), ("volume", volume, 0, 200)):
            self._lib.espeak_SetParameter(_PARAM[name], int(min(max(value, low), high)), 0)
        self._chunks.clear()
        encoded = text.encode("utf-8")
        self._lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


def say(text: str, seed: int = 0, **params) -> tuple[np.ndarray, int]:
    """Synthesize ``text`` (see :meth:`Espeak.say` for ``params``) in a forked child; returns samples and rate.

    ``seed`` seeds espeak-ng's own random generator (some voices add random breath and jitter).

    The calling process must never synthesize itself, or its children inherit the used state.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: synthesize, send the rate and float32 samples through the pipe, exit at once
        status = 1
        try:
            os.close(read_end)
            tts = Espeak()
            tts.seed(seed)
            samples = tts.say(text, **params)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(np.int32(tts.sample_rate).tobytes() + samples.astype("<f4").tobytes())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or len(payload) < 4:
        raise EmotuneError(f"espeak-ng failed to synthesize {text!r} (child exit status {status}).")
    return np.frombuffer(payload[4:], dtype="<f4").copy(), int(np.frombuffer(payload[:4], dtype=np.int32)[0])
