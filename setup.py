"""Build pecca's Cython kernels with -O3 and OpenMP.

OpenMP is detected by compiling and linking a small test program; without it (or with
PECCA_NO_OPENMP=1) the kernels build single-threaded and `pecca info` says so. No
-march=native: the AVX2 / AVX-512 paths are selected at run time (see pecca/_kernels/simd.h).
"""
import os
import shutil
import sys
import tempfile
import textwrap
import warnings

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = ["runtime", "f32", "ops", "f16", "q8", "q4"]
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "nonecheck": False,
    "cdivision": True,
}


def openmp_flags(compiler):
    """Compile/link flags that enable OpenMP with this compiler, or [] when it has none."""
    if os.environ.get("PECCA_NO_OPENMP", "") not in ("", "0"):
        return []
    flag = "/openmp" if compiler.compiler_type == "msvc" else "-fopenmp"
    code = textwrap.dedent("""\
        #include <omp.h>
        int main(void) { int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1; }
        """)
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "omp_test.c")
        with open(src, "w") as f:
            f.write(code)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
        compiler.link_executable(objs, os.path.join(tmp, "omp_test"), extra_postargs=[flag])
        return [flag]
    except Exception:  # any compile or link failure means no usable OpenMP
        return []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        omp = openmp_flags(self.compiler)
        if not omp:
            warnings.warn("pecca: building WITHOUT OpenMP; kernels will run on one thread")
            print("pecca: building WITHOUT OpenMP; kernels will run on one thread", file=sys.stderr)
        # with and without OpenMP give different objects from the same sources: never let the
        # up-to-date check reuse one build for the other
        self.force = True
        opt = ["/O2"] if self.compiler.compiler_type == "msvc" else ["-O3"]
        for ext in self.extensions:
            ext.extra_compile_args = opt + omp
            ext.extra_link_args = omp
        super().build_extensions()


extensions = [
    Extension(f"pecca._kernels.{name}", [f"pecca/_kernels/{name}.pyx"],
              include_dirs=["pecca/_kernels"], depends=["pecca/_kernels/simd.h",
                                                         "pecca/_kernels/f32_kernels.h",
                                                         "pecca/_kernels/f32_gemm.h",
                                                         "pecca/_kernels/f16_kernels.h",
                                                         "pecca/_kernels/attention.h",
                                                         "pecca/_kernels/q8_kernels.h",
                                                         "pecca/_kernels/q4_kernels.h"])
    for name in KERNELS
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES),
    cmdclass={"build_ext": BuildExt},
)
