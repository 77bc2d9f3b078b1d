# cython: language_level=3
"""What the compiled kernels can do on this machine: OpenMP, thread count, SIMD path.

Notes
-----
``openmp_enabled`` is fixed at build time (the build falls back to a serial build when the
compiler has no OpenMP). The SIMD path is chosen at run time from the CPU's features;
``PECCA_SIMD=portable|avx2|avx512`` forces a lower one. The int8 kernels (``q8``) use
AVX512-VNNI on the avx512 path when the CPU has it (``vnni_supported``, ``vnni_available``).
"""
from pecca._kernels.kernels cimport (pecca_simd_level, pecca_simd_supported, pecca_simd_reset,
                                     pecca_vnni_supported, q8_uses_vnni)

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define PECCA_OPENMP 1
    static int pecca_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define PECCA_OPENMP 0
    static int pecca_omp_max_threads(void) { return 1; }
    #endif
    """
    int PECCA_OPENMP
    int pecca_omp_max_threads() nogil

SIMD_NAMES = ("portable", "avx2", "avx512")


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (multi-threaded)."""
    return bool(PECCA_OPENMP)


def omp_max_threads():
    """OpenMP's own default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return pecca_omp_max_threads()


def simd_path():
    """Name of the SIMD path the kernels use now."""
    return SIMD_NAMES[pecca_simd_level()]


def simd_supported():
    """Name of the best SIMD path this CPU supports."""
    return SIMD_NAMES[pecca_simd_supported()]


def vnni_supported():
    """True when this CPU has AVX512-VNNI (with AVX-512 F/BW/VL)."""
    return bool(pecca_vnni_supported())


def vnni_available():
    """True when the int8 (q8) kernels use AVX512-VNNI now: the CPU has it and the SIMD path
    is avx512. Otherwise they run their AVX2 code (avx2 and avx512 paths) or portable code."""
    return bool(q8_uses_vnni())


def int8_path():
    """Name of the code the int8 (q8) kernels run now: 'avx512-vnni', 'avx2' or 'portable'."""
    if q8_uses_vnni():
        return "avx512-vnni"
    return "portable" if pecca_simd_level() == 0 else "avx2"


def reset_simd():
    """Re-read PECCA_SIMD (for tests that switch paths within one process)."""
    pecca_simd_reset()
    return simd_path()
