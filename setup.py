"""Build of horizon's optional native extension; pyproject.toml stays the metadata source.

``horizon._native`` (native/adamw.cpp, torch-free C++17) holds the fused CPU AdamW kernel and
``horizon._native_io`` (native/direct_io*.cpp) the SSD tier's O_DIRECT I/O (io_uring or a thread pool).
Both are built at install time (``pip install -e .``), never at first use. ``optional=True``: where no
C++ compiler is available a build is skipped and horizon falls back to its pure-Python/torch path.
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
        ),
        Extension(
            "horizon._native_io",
            sources=["native/direct_io.cpp", "native/direct_io_module.cpp"],
            depends=["native/direct_io.h"],
            include_dirs=["native"],
            language="c++",
            extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
    ],
)
