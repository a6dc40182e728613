"""An optional C kernel for the CPU hot loop, compiled on first use with the system C compiler.

It computes exactly what the torch code in `directions.py` computes (same hash, same table, plain
IEEE float32 multiplies and adds with contraction disabled), only in one pass instead of many:
the tests check the two agree bit for bit. Without a C compiler zotune uses the torch code.
Set ZOTUNE_NATIVE=0 to force the torch code.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>

static inline __m256i zt_mix8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846ca68bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
#endif

/* lowbias32 (a bijection on 32 bits), two keyed rounds: cheap and vectorizable (32-bit lanes). */
static inline uint32_t zt_mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du;
    x ^= x >> 15; x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

static inline uint32_t zt_hash(uint64_t key, uint32_t i) {
    return zt_mix(zt_mix(i + (uint32_t)key) ^ (uint32_t)(key >> 32));
}

/* z[j] for element index start + j: inverse-CDF table with linear interpolation. */
void zt_fill_normal(float *out, int64_t n, uint64_t key, int64_t start,
                    const float *table, const float *delta) {
    uint32_t s0 = (uint32_t)start;
    int64_t j = 0;
#ifdef __AVX2__
    /* The same arithmetic 8 lanes at a time (gcc does not vectorize the table gathers). */
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)s0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i klo = _mm256_set1_epi32((int)(uint32_t)key);
    const __m256i khi = _mm256_set1_epi32((int)(uint32_t)(key >> 32));
    for (; j + 8 <= n; j += 8) {
        __m256i x = zt_mix8(_mm256_xor_si256(zt_mix8(_mm256_add_epi32(idx, klo)), khi));
        __m256i c = _mm256_srli_epi32(x, 20);
        __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFFF))),
                                 _mm256_set1_ps(9.5367431640625e-07f));
        __m256 t = _mm256_mul_ps(f, _mm256_i32gather_ps(delta, c, 4));
        _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_i32gather_ps(table, c, 4), t));
        idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
    }
#endif
    for (; j < n; j++) {
        uint32_t u = zt_hash(key, s0 + (uint32_t)j);
        uint32_t c = u >> 20;
        float f = (float)(int32_t)(u & 0xFFFFFu) * 9.5367431640625e-07f;
        float t = f * delta[c];
        out[j] = table[c] + t;
    }
}

void zt_fill_sign(float *out, int64_t n, uint64_t key, int64_t start) {
    uint32_t s0 = (uint32_t)start;
    for (int64_t j = 0; j < n; j++) {
        uint32_t u = zt_hash(key, s0 + (uint32_t)j);
        out[j] = (float)(int32_t)(u >> 31) * 2.0f - 1.0f;
    }
}

/* out = theta + z*scale; bit k of bits marks elements where (out - z*scale) != theta, whose
   theta is appended to aside. Returns the number of such elements. */
int64_t zt_encode(const float *theta, const float *z, float scale, float *out,
                  uint8_t *bits, float *aside, int64_t n) {
    uint8_t *flag = (uint8_t *)aside;  /* the aside buffer doubles as flag scratch (n bytes) */
    uint32_t any = 0;
    for (int64_t j = 0; j < n; j++) {
        float s = z[j] * scale;
        float moved = theta[j] + s;
        float back = moved - s;
        uint8_t bad = back != theta[j];
        flag[j] = bad;
        any |= bad;
        out[j] = moved;
    }
    int64_t count = 0;
    if (!any) {
        for (int64_t b = 0; b < (n + 7) / 8; b++) bits[b] = 0;
        return 0;
    }
    for (int64_t b = 0; b < n; b += 8) {
        uint32_t byte = 0;
        int64_t m = n - b < 8 ? n - b : 8;
        for (int64_t k = 0; k < m; k++) byte |= (uint32_t)flag[b + k] << k;
        bits[b >> 3] = (uint8_t)byte;
    }
    for (int64_t b = 0; b < n; b += 8) {  /* flags are consumed: aside overwrites them in order */
        uint32_t byte = bits[b >> 3];
        while (byte) {
            int k = __builtin_ctz(byte);
            aside[count++] = theta[b + k];
            byte &= byte - 1;
        }
    }
    return count;
}

/* theta = param - z*scale, then the elements marked in bits take their kept-aside values. */
void zt_decode(const float *param, const float *z, float scale, float *theta,
               const uint8_t *bits, const float *aside, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        float s = z[j] * scale;
        theta[j] = param[j] - s;
    }
    if (!bits) return;
    int64_t count = 0;
    for (int64_t b = 0; b < n; b += 8) {
        uint32_t byte = bits[b >> 3];
        while (byte) {
            int k = __builtin_ctz(byte);
            theta[b + k] = aside[count++];
            byte &= byte - 1;
        }
    }
}
"""

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet


def _cache_dir() -> Path:
    return Path(os.environ.get("ZOTUNE_CACHE", Path.home() / ".cache" / "zotune")) / "native"


def _compile() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    tag = hashlib.sha256((SOURCE + " ".join(FLAGS) + platform.machine() + platform.node()).encode())
    lib = _cache_dir() / f"zotune_{tag.hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "zotune.c"
            src.write_text(SOURCE)
            out = Path(tmp) / "zotune.so"
            done = subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], capture_output=True)
            if done.returncode != 0:
                return None
            os.replace(out, lib)  # atomic: concurrent first uses don't see a partial file
    c = ctypes.CDLL(str(lib))
    f32, i64, u64, u8 = (
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_int64,
        ctypes.c_uint64,
        ctypes.c_void_p,
    )
    c.zt_fill_normal.argtypes = [f32, i64, u64, i64, f32, f32]
    c.zt_fill_sign.argtypes = [f32, i64, u64, i64]
    c.zt_encode.argtypes = [f32, f32, ctypes.c_float, f32, u8, f32, i64]
    c.zt_encode.restype = i64
    c.zt_decode.argtypes = [f32, f32, ctypes.c_float, f32, u8, f32, i64]
    return c


def lib() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no compiler, or ZOTUNE_NATIVE=0)."""
    global _lib
    if os.environ.get("ZOTUNE_NATIVE", "1") == "0":
        return None
    if _lib is False:
        try:
            _lib = _compile()
        except OSError:
            _lib = None
    return _lib or None


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


def bptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())
