// CPython binding of native/direct_io.h: module horizon._native_io (plain C API, no torch).
// Engines and batches travel to Python as capsules; horizon/io/native.py wraps them.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstring>

#include "direct_io.h"

namespace {

using horizon_io::Batch;
using horizon_io::Engine;
using horizon_io::Op;
using horizon_io::Request;

constexpr const char* kEngineName = "horizon._native_io.Engine";
constexpr const char* kBatchName = "horizon._native_io.Batch";

void free_engine(PyObject* capsule) {
  auto* engine = static_cast<Engine*>(PyCapsule_GetPointer(capsule, kEngineName));
  Py_BEGIN_ALLOW_THREADS  // joining the workers waits for the queued chunks
  delete engine;
  Py_END_ALLOW_THREADS
}

void free_batch(PyObject* capsule) {
  delete static_cast<std::shared_ptr<Batch>*>(PyCapsule_GetPointer(capsule, kBatchName));
}

PyObject* py_open_direct(PyObject*, PyObject* args) {
  const char* path;
  int create;
  if (!PyArg_ParseTuple(args, "sp:open_direct", &path, &create)) return nullptr;
  const int fd = horizon_io::open_direct(path, create);
  if (fd < 0) {
    errno = -fd;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
  }
  return PyLong_FromLong(fd);
}

PyObject* py_engine(PyObject*, PyObject* args) {
  int num_workers, use_uring, queue_depth;
  unsigned long long chunk_bytes;
  if (!PyArg_ParseTuple(args, "ipiK:engine", &num_workers, &use_uring, &queue_depth, &chunk_bytes)) return nullptr;
  if (num_workers < 1 || queue_depth < 1 || chunk_bytes < horizon_io::kAlignBytes)
    return PyErr_Format(PyExc_ValueError, "num_workers and queue_depth must be >= 1 and chunk_bytes >= %llu",
                        static_cast<unsigned long long>(horizon_io::kAlignBytes));
  Engine* engine = new Engine(num_workers, use_uring, queue_depth, chunk_bytes);
  PyObject* capsule = PyCapsule_New(engine, kEngineName, free_engine);
  if (capsule == nullptr) delete engine;
  return capsule;
}

PyObject* py_backend(PyObject*, PyObject* capsule) {
  auto* engine = static_cast<Engine*>(PyCapsule_GetPointer(capsule, kEngineName));
  return engine == nullptr ? nullptr : PyUnicode_FromString(engine->backend());
}

// submit(engine, [(op, fd, address, nbytes, offset), ...]) -> batch
PyObject* py_submit(PyObject*, PyObject* args) {
  PyObject *capsule, *list;
  if (!PyArg_ParseTuple(args, "OO!:submit", &capsule, &PyList_Type, &list)) return nullptr;
  auto* engine = static_cast<Engine*>(PyCapsule_GetPointer(capsule, kEngineName));
  if (engine == nullptr) return nullptr;
  std::vector<Request> requests;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    int op, fd;
    unsigned long long address, nbytes, offset;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(list, i), "iiKKK", &op, &fd, &address, &nbytes, &offset)) return nullptr;
    if (op != 0 && op != 1) return PyErr_Format(PyExc_ValueError, "request %zd: op must be 0 (read) or 1 (write)", i);
    requests.push_back({static_cast<Op>(op), fd, reinterpret_cast<void*>(address), nbytes, offset});
  }
  const std::string problem = horizon_io::check_aligned(requests);
  if (!problem.empty()) return PyErr_Format(PyExc_ValueError, "%s", problem.c_str());
  auto* batch = new std::shared_ptr<Batch>(engine->submit(requests));
  PyObject* out = PyCapsule_New(batch, kBatchName, free_batch);
  if (out == nullptr) delete batch;
  return out;
}

// wait(batch) -> (errno, request_index); the GIL is released while waiting.
PyObject* py_wait(PyObject*, PyObject* capsule) {
  auto* batch = static_cast<std::shared_ptr<Batch>*>(PyCapsule_GetPointer(capsule, kBatchName));
  if (batch == nullptr) return nullptr;
  horizon_io::Completion c;
  Py_BEGIN_ALLOW_THREADS
  c = (*batch)->wait();
  Py_END_ALLOW_THREADS
  return Py_BuildValue("(iL)", c.errno_value, static_cast<long long>(c.request_index));
}

PyObject* py_done(PyObject*, PyObject* capsule) {
  auto* batch = static_cast<std::shared_ptr<Batch>*>(PyCapsule_GetPointer(capsule, kBatchName));
  if (batch == nullptr) return nullptr;
  return PyBool_FromLong((*batch)->done());
}

PyMethodDef kMethods[] = {
    {"open_direct", py_open_direct, METH_VARARGS, "open_direct(path, create) -> fd, opened O_RDWR|O_DIRECT"},
    {"engine", py_engine, METH_VARARGS, "engine(num_workers, use_uring, queue_depth, chunk_bytes) -> engine"},
    {"backend", py_backend, METH_O, "backend(engine) -> 'io_uring' or 'threads'"},
    {"submit", py_submit, METH_VARARGS, "submit(engine, [(op, fd, address, nbytes, offset)]) -> batch"},
    {"wait", py_wait, METH_O, "wait(batch) -> (errno, request_index); errno 0 on success"},
    {"done", py_done, METH_O, "done(batch) -> bool"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "horizon._native_io",
                       "O_DIRECT batches through io_uring or a pread/pwrite thread pool.", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__native_io(void) {
  PyModuleDef_Init(&kModule);
  return PyModule_Create(&kModule);
}
