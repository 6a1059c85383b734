/* The Python entry points of blockdiag.c (module pfgdf_plugin._blockdiag).
 *
 * Each takes the C function's arguments as Python ints (addresses from Tensor.data_ptr(), None for
 * NULL) and returns its return code; pfgdf_plugin.native checks the tensors behind the addresses
 * first. A vectorcall entry costs a fraction of a microsecond, which matters at batch 1, where a
 * layer's product takes about ten. The products run without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

int pfgdf_block_gemv(const float *x, const int64_t *idx, int64_t nfeat, const float *w, const float *b, int relu,
                     float *y, int64_t blocks, int64_t block_in, int64_t block_out, const int64_t *oidx, int64_t m);
int pfgdf_tuned(void);
int pfgdf_isa(void);
int pfgdf_set_isa(int level);
int pfgdf_block_gemm(const float *src, int64_t rows, int64_t n, int64_t fs, int64_t rs, const int64_t *idx,
                     const float *w, const float *b, int relu, float *out, int64_t blocks, int64_t in, int64_t bo,
                     const int64_t *oidx, int64_t m, const float *packed, int64_t packed_floats, int packed_isa);
int64_t pfgdf_packed_floats(int64_t blocks, int64_t in, int64_t bo, int level);
int pfgdf_pack_weights(const float *w, int64_t blocks, int64_t in, int64_t bo, float *dst, int64_t floats);

/* args as int64 (None: 0), exactly count of them; 0 on success, -1 with a Python error set. */
static int pfgdf_ints(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t count, const char *name, int64_t *v) {
  if (nargs != count) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, count, nargs);
    return -1;
  }
  for (Py_ssize_t k = 0; k < count; ++k) {
    v[k] = args[k] == Py_None ? 0 : (int64_t)PyLong_AsLongLong(args[k]);
    if (v[k] == -1 && PyErr_Occurred()) return -1;
  }
  return 0;
}

#define PFGDF_F(k) ((float *)(intptr_t)v[k])
#define PFGDF_L(k) ((const int64_t *)(intptr_t)v[k])

static PyObject *pfgdf_py_gemv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  int64_t v[12];
  if (pfgdf_ints(args, nargs, 12, "block_gemv", v)) return NULL;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = pfgdf_block_gemv(PFGDF_F(0), PFGDF_L(1), v[2], PFGDF_F(3), PFGDF_F(4), (int)v[5], PFGDF_F(6), v[7], v[8], v[9],
                        PFGDF_L(10), v[11]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}

static PyObject *pfgdf_py_gemm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  int64_t v[18];
  if (pfgdf_ints(args, nargs, 18, "block_gemm", v)) return NULL;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = pfgdf_block_gemm(PFGDF_F(0), v[1], v[2], v[3], v[4], PFGDF_L(5), PFGDF_F(6), PFGDF_F(7), (int)v[8], PFGDF_F(9),
                        v[10], v[11], v[12], PFGDF_L(13), v[14], PFGDF_F(15), v[16], (int)v[17]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}

static PyObject *pfgdf_py_packed_floats(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  int64_t v[4];
  if (pfgdf_ints(args, nargs, 4, "packed_floats", v)) return NULL;
  return PyLong_FromLongLong(pfgdf_packed_floats(v[0], v[1], v[2], (int)v[3]));
}

static PyObject *pfgdf_py_pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  int64_t v[6];
  if (pfgdf_ints(args, nargs, 6, "pack_weights", v)) return NULL;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = pfgdf_pack_weights(PFGDF_F(0), v[1], v[2], v[3], PFGDF_F(4), v[5]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}

static PyObject *pfgdf_py_tuned(PyObject *self, PyObject *unused) {
  (void)self, (void)unused;
  return PyBool_FromLong(pfgdf_tuned());
}

static PyObject *pfgdf_py_isa(PyObject *self, PyObject *unused) {
  (void)self, (void)unused;
  return PyLong_FromLong(pfgdf_isa());
}

static PyObject *pfgdf_py_set_isa(PyObject *self, PyObject *arg) {
  (void)self;
  long level = PyLong_AsLong(arg);
  if (level == -1 && PyErr_Occurred()) return NULL;
  int previous = level == 1 || level == 2 ? pfgdf_set_isa((int)level) : -1;
  if (previous < 0) {
    PyErr_Format(PyExc_ValueError, "set_isa: level must be 1 (AVX2) or 2 (AVX-512), got %ld", level);
    return NULL;
  }
  return PyLong_FromLong(previous);
}

static PyMethodDef pfgdf_methods[] = {
    {"tuned", pfgdf_py_tuned, METH_NOARGS, "tuned() -> bool: whether this CPU runs the kernels (AVX2 + FMA)"},
    {"isa", pfgdf_py_isa, METH_NOARGS, "isa() -> int: the batch products' instructions (2 AVX-512, 1 AVX2, 0 none)"},
    {"set_isa", pfgdf_py_set_isa, METH_O, "set_isa(level) -> int: cap isa() at 1 or 2; returns the previous cap"},
    {"block_gemv", (PyCFunction)(void (*)(void))pfgdf_py_gemv, METH_FASTCALL,
     "block_gemv(x, idx, nfeat, w, b, relu, y, blocks, block_in, block_out, oidx, m) -> int"},
    {"block_gemm", (PyCFunction)(void (*)(void))pfgdf_py_gemm, METH_FASTCALL,
     "block_gemm(src, rows, n, fs, rs, idx, w, b, relu, out, blocks, in, bo, oidx, m, packed, packed_floats, "
     "packed_isa) -> int"},
    {"packed_floats", (PyCFunction)(void (*)(void))pfgdf_py_packed_floats, METH_FASTCALL,
     "packed_floats(blocks, in, bo, level) -> int: floats of the weights packed for instructions level"},
    {"pack_weights", (PyCFunction)(void (*)(void))pfgdf_py_pack, METH_FASTCALL,
     "pack_weights(w, blocks, in, bo, dst, floats) -> int: the level packed for, or < 0"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef pfgdf_module = {PyModuleDef_HEAD_INIT, "_blockdiag",
                                          "C kernels of the MPD-converted layers (see pfgdf_plugin.native).", -1,
                                          pfgdf_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__blockdiag(void) { return PyModule_Create(&pfgdf_module); }
