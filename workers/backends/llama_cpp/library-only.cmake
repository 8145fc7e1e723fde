# Included at the end of llama.cpp's own project() call (Makefile: CMAKE_PROJECT_llama.cpp_INCLUDE).
# llama-cpp-python forces LLAMA_BUILD_COMMON on, which compiles llama.cpp's `common` library (argument
# parsing, chat templates, a JSON-schema grammar, an HTTP client) and installs it as a shared library
# the Python package never loads. A normal variable in llama.cpp's scope shadows that cache entry
# (policy CMP0077), so only the libraries the backend loads are built: llama, ggml, ggml-base, ggml-cpu.
set(LLAMA_BUILD_COMMON OFF)
