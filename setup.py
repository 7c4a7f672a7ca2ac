"""Build of horizon's optional native extension; pyproject.toml stays the metadata source.

``horizon._native`` (native/*.cpp, torch-free C++17) holds the fused CPU AdamW kernel. It is built at
install time (``pip install -e .``), never at first use. ``optional=True``: where no C++ compiler is
available the build is skipped and horizon falls back to its pure-torch path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "horizon._native",
            sources=["native/adamw.cpp"],
            depends=["native/adamw.h"],
            include_dirs=["native"],
            language="c++",
            # -ffp-contract=off: no fused multiply-add the kernel does not write out (bitwise parity
            # with torch). -fno-math-errno: sqrt compiles to one instruction (results unchanged).
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off",
                                "-fno-math-errno"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
)
