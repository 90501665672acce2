/* tmem._lz4pages: LZ4 block codec for 4096-byte pages, without python-lz4's extra copies.
 *
 * python-lz4 compresses and decompresses into a malloc'ed scratch buffer and then copies
 * the result into a new bytes object; for 4 KiB pages that wrapper costs about as much
 * as LZ4 itself. These functions produce the same raw LZ4 block format (pages stored by
 * one are read by the other) straight into their result:
 *
 *   compress(page) -> bytes            raw LZ4 block of a page (at most 4096 bytes in)
 *   decompress(block) -> bytes         exactly 4096 bytes, or ValueError
 *   gather(arena, spans) -> bytearray  a run of pages read out of zcache's arena in one
 *                                      call: spans is a flat list [start, length, ...];
 *                                      length 1..4095 = LZ4 block at arena[start:],
 *                                      4096 = raw page, 0 = the page is the 8-byte
 *                                      pattern ``start`` repeated, -1 = zeros.
 *   fills(pages) -> list[int]          for a buffer of whole pages, [index, pattern, ...]
 *                                      for each page that is one 8-byte value repeated
 *                                      (pattern: those 8 bytes as a little-endian int;
 *                                      zero pages: 0). A memcmp per page: ~free for
 *                                      pages that are not.
 *
 * Every length and offset is checked: bad input raises, it never reads out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <lz4.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096

static PyObject *
pages_compress(PyObject *module, PyObject *arg)
{
    Py_buffer src;
    char out[LZ4_COMPRESSBOUND(PAGE)];
    int n;

    if (PyObject_GetBuffer(arg, &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (src.len > PAGE) {
        PyBuffer_Release(&src);
        PyErr_Format(PyExc_ValueError, "lz4: a page is at most %d bytes, got %zd", PAGE,
                     src.len);
        return NULL;
    }
    n = LZ4_compress_default((const char *)src.buf, out, (int)src.len, (int)sizeof out);
    PyBuffer_Release(&src);
    if (n <= 0) {
        PyErr_SetString(PyExc_ValueError, "lz4: compression failed");
        return NULL;
    }
    return PyBytes_FromStringAndSize(out, n);
}

static PyObject *
pages_decompress(PyObject *module, PyObject *arg)
{
    Py_buffer src;
    PyObject *result;
    int n;

    if (PyObject_GetBuffer(arg, &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (src.len > INT32_MAX) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "lz4: block too large");
        return NULL;
    }
    result = PyBytes_FromStringAndSize(NULL, PAGE);
    if (result == NULL) {
        PyBuffer_Release(&src);
        return NULL;
    }
    n = LZ4_decompress_safe((const char *)src.buf, PyBytes_AS_STRING(result), (int)src.len,
                            PAGE);
    PyBuffer_Release(&src);
    if (n != PAGE) {
        Py_DECREF(result);
        PyErr_Format(PyExc_ValueError, "lz4: corrupt page (decompressed to %d bytes, not %d)",
                     n, PAGE);
        return NULL;
    }
    return result;
}

static void
fill_pattern(char *dst, uint64_t pattern)
{
    unsigned char word[8];
    int i;
    for (i = 0; i < 8; i++)
        word[i] = (unsigned char)(pattern >> (8 * i)); /* little-endian, as zcache stores */
    for (i = 0; i < PAGE; i += 8)
        memcpy(dst + i, word, 8);
}

static PyObject *
pages_gather(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    PyObject *spans, *result;
    Py_ssize_t count, i;
    char *out;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "gather(arena, spans) takes 2 arguments");
        return NULL;
    }
    spans = args[1];
    if (!PyList_Check(spans) || PyList_GET_SIZE(spans) % 2) {
        PyErr_SetString(PyExc_TypeError, "spans must be a list of (start, length) pairs");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &arena, PyBUF_SIMPLE) < 0)
        return NULL;
    count = PyList_GET_SIZE(spans) / 2;
    result = PyByteArray_FromStringAndSize(NULL, count * PAGE);
    if (result == NULL)
        goto fail;
    out = PyByteArray_AS_STRING(result);
    for (i = 0; i < count; i++) {
        PyObject *first = PyList_GET_ITEM(spans, 2 * i);
        long long length = PyLong_AsLongLong(PyList_GET_ITEM(spans, 2 * i + 1));
        long long start;
        char *dst = out + i * PAGE;
        if (length == -1 && PyErr_Occurred())
            goto fail;
        if (length == 0) { /* a same-filled page: any 64-bit pattern */
            uint64_t pattern = PyLong_AsUnsignedLongLongMask(first);
            if (pattern == (uint64_t)-1 && PyErr_Occurred())
                goto fail;
            fill_pattern(dst, pattern);
            continue;
        }
        start = PyLong_AsLongLong(first);
        if (start == -1 && PyErr_Occurred())
            goto fail;
        if (length == -1) {
            memset(dst, 0, PAGE);
        }
        else if (length < 0 || length > PAGE || start < 0 || start > arena.len - length) {
            PyErr_Format(PyExc_ValueError, "span %lld+%lld is outside the arena", start,
                         length);
            goto fail;
        }
        else if (length == PAGE) {
            memcpy(dst, (const char *)arena.buf + start, PAGE);
        }
        else if (LZ4_decompress_safe((const char *)arena.buf + start, dst, (int)length, PAGE) !=
                 PAGE) {
            PyErr_Format(PyExc_ValueError, "lz4: corrupt page at arena offset %lld", start);
            goto fail;
        }
    }
    PyBuffer_Release(&arena);
    return result;
fail:
    Py_XDECREF(result);
    PyBuffer_Release(&arena);
    return NULL;
}

static PyObject *
pages_fills(PyObject *module, PyObject *arg)
{
    Py_buffer src;
    PyObject *result = NULL;
    Py_ssize_t i, count;

    if (PyObject_GetBuffer(arg, &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (src.len % PAGE) {
        PyErr_Format(PyExc_ValueError, "fills: whole %d-byte pages expected, got %zd bytes",
                     PAGE, src.len);
        goto done;
    }
    result = PyList_New(0);
    if (result == NULL)
        goto done;
    count = src.len / PAGE;
    for (i = 0; i < count; i++) {
        const unsigned char *page = (const unsigned char *)src.buf + i * PAGE;
        uint64_t pattern = 0;
        PyObject *index, *value;
        int k, failed;
        /* 8-periodic <=> one 8-byte value repeated; stops at the first difference */
        if (memcmp(page, page + 8, PAGE - 8) != 0)
            continue;
        for (k = 7; k >= 0; k--)
            pattern = pattern << 8 | page[k];
        index = PyLong_FromSsize_t(i);
        value = PyLong_FromUnsignedLongLong(pattern);
        failed = index == NULL || value == NULL || PyList_Append(result, index) < 0 ||
                 PyList_Append(result, value) < 0;
        Py_XDECREF(index);
        Py_XDECREF(value);
        if (failed) {
            Py_CLEAR(result);
            goto done;
        }
    }
done:
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef pages_methods[] = {
    {"compress", pages_compress, METH_O, "compress(page) -> bytes: a raw LZ4 block."},
    {"decompress", pages_decompress, METH_O,
     "decompress(block) -> bytes: the 4096-byte page (ValueError if corrupt)."},
    {"gather", (PyCFunction)(void (*)(void))pages_gather, METH_FASTCALL,
     "gather(arena, spans) -> bytearray: a run of pages out of the arena (see module doc)."},
    {"fills", pages_fills, METH_O,
     "fills(pages) -> list[int]: [index, pattern, ...] of the same-filled pages."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pages_module = {
    PyModuleDef_HEAD_INIT, "tmem._lz4pages",
    "LZ4 block codec for 4096-byte pages (no intermediate copies).", -1, pages_methods,
};

PyMODINIT_FUNC
PyInit__lz4pages(void)
{
    return PyModule_Create(&pages_module);
}
