/*
 * The per-entry loop of a host IMA judgement, compiled: tvorch.core.attestation.ima
 * documents the contract (_fold_plain_binary, _fold_plain_ascii are the reference
 * it must equal, byte for byte, on every input; tests/unit/test_ima_fold.py checks).
 *
 * Why it exists: a passing host list is tens of thousands of plain ima-ng entries,
 * and each costs three hashes (SHA-1 template-hash check, SHA-256 of the template
 * data, the PCR 10 extend). In Python each hash is an object made and dropped
 * around ~50 ns of hashing; here the hashing is most of the time.
 *
 * fold(data: bytes, binary: bool, target: bytes | None)  (any buffer for DATA)
 *     -> (pcr10: bytes, end: int, entries: list[tuple[str, str]]) | None
 *
 * Walks DATA from its start while every entry is plain (PCR 10, "ima-ng", a sha256
 * file digest, a NUL-terminated name, its SHA-1 template hash right), extending a
 * sha256 PCR from zero, and stops after the entry whose extend reaches TARGET.
 * Returns the PCR value, the offset where it stopped, and each entry's (name,
 * digest in hex). None when an entry is not plain: the caller's general path
 * judges such lists. Reads only inside DATA; allocates Python objects and two hash
 * contexts, freed before it returns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define PCR_SIZE 32
#define SHA1_SIZE 20
#define NAME_MAX_ASCII 4095 /* the reference's length table ends at a 4096-byte name field */

/* The fixed head of a plain binary entry: PCR, template hash, template name, data length,
   d-ng prefix, digest, n-ng length (86 bytes; the name follows). */
#define BIN_HEAD 86
static const unsigned char PLAIN_TEMPLATE[10] = {6, 0, 0, 0, 'i', 'm', 'a', '-', 'n', 'g'};
static const unsigned char PLAIN_DIGEST[12] = {40, 0, 0, 0, 's', 'h', 'a', '2', '5', '6', ':', 0};
/* "10 <40 hex> ima-ng sha256:<64 hex> <name>": every column but the name at a fixed place. */
#define ASCII_HEAD 123
static const char ASCII_MIDDLE[] = " ima-ng sha256:"; /* at column 43 */

static EVP_MD *sha1_md, *sha256_md;

typedef struct {
    EVP_MD_CTX *sha1, *sha256;
} hashers;

static int hash(EVP_MD_CTX *ctx, const EVP_MD *md, const unsigned char *data, size_t len, unsigned char *out)
{
    return EVP_DigestInit_ex2(ctx, md, NULL) && EVP_DigestUpdate(ctx, data, len) &&
           EVP_DigestFinal_ex(ctx, out, NULL);
}

/* Check the template hash, extend PCR with sha256(td). 1: done, 0: hash mismatch, -1: OpenSSL failed. */
static int fold_one(hashers *h, const unsigned char *td, size_t td_len, const unsigned char *expected_sha1,
                    const char *expected_hex, unsigned char *pcr)
{
    static const char hexdigits[] = "0123456789abcdef";
    unsigned char sha1[SHA1_SIZE], both[2 * PCR_SIZE];
    if (!hash(h->sha1, sha1_md, td, td_len, sha1))
        return -1;
    if (expected_sha1 != NULL) {
        if (memcmp(sha1, expected_sha1, SHA1_SIZE) != 0)
            return 0;
    } else {
        for (int i = 0; i < SHA1_SIZE; i++)
            if (expected_hex[2 * i] != hexdigits[sha1[i] >> 4] || expected_hex[2 * i + 1] != hexdigits[sha1[i] & 15])
                return 0;
    }
    memcpy(both, pcr, PCR_SIZE);
    if (!hash(h->sha256, sha256_md, td, td_len, both + PCR_SIZE))
        return -1;
    return hash(h->sha256, sha256_md, both, sizeof both, pcr) ? 1 : -1;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int nibble(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Append (name, digest hex) to LIST; -1 with a Python error set, 0 when NAME is not strict UTF-8. */
static int append(PyObject *list, const char *name, Py_ssize_t name_len, PyObject *digest_hex)
{
    if (digest_hex == NULL)
        return -1;
    PyObject *path = PyUnicode_DecodeUTF8(name, name_len, NULL);
    if (path == NULL) {
        Py_DECREF(digest_hex);
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    PyObject *item = PyTuple_New(2);
    if (item == NULL) {
        Py_DECREF(path);
        Py_DECREF(digest_hex);
        return -1;
    }
    PyTuple_SET_ITEM(item, 0, path);
    PyTuple_SET_ITEM(item, 1, digest_hex);
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc < 0 ? -1 : 1;
}

static PyObject *hex_of(const unsigned char *digest)
{
    static const char hexdigits[] = "0123456789abcdef";
    PyObject *out = PyUnicode_New(2 * PCR_SIZE, 127);
    if (out == NULL)
        return NULL;
    Py_UCS1 *p = PyUnicode_1BYTE_DATA(out);
    for (int i = 0; i < PCR_SIZE; i++) {
        p[2 * i] = hexdigits[digest[i] >> 4];
        p[2 * i + 1] = hexdigits[digest[i] & 15];
    }
    return out;
}

/* Each walker returns 1 when done (*END set), 0 when an entry is not plain, -1 on a Python error. */

static int walk_binary(hashers *h, const unsigned char *buf, size_t end, const unsigned char *target,
                       unsigned char *pcr, size_t *stop, PyObject *entries)
{
    size_t pos = 0;
    while (pos < end) {
        if (end - pos < BIN_HEAD)
            return 0;
        const unsigned char *e = buf + pos;
        uint64_t td_len = le32(e + 34), n_len = le32(e + 82);
        uint64_t td_end = (uint64_t)pos + 38 + td_len;
        if (le32(e) != 10 || memcmp(e + 24, PLAIN_TEMPLATE, sizeof PLAIN_TEMPLATE) != 0 ||
            memcmp(e + 38, PLAIN_DIGEST, sizeof PLAIN_DIGEST) != 0 || td_len != 48 + n_len || td_end > end ||
            n_len < 2)
            return 0;
        /* The name: NUL-terminated, no other NUL. */
        const unsigned char *name = e + BIN_HEAD;
        size_t name_len = (size_t)n_len - 1;
        if (name[name_len] != 0 || memchr(name, 0, name_len) != NULL)
            return 0;
        int folded = fold_one(h, e + 38, (size_t)td_len, e + 4, NULL, pcr);
        if (folded <= 0) {
            if (folded < 0)
                PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not hash");
            return folded;
        }
        int added = append(entries, (const char *)name, (Py_ssize_t)name_len, hex_of(e + 50));
        if (added <= 0)
            return added;
        pos = (size_t)td_end;
        if (target != NULL && memcmp(pcr, target, PCR_SIZE) == 0)
            break;
    }
    *stop = pos;
    return 1;
}

static int walk_ascii(hashers *h, const unsigned char *buf, size_t end, const unsigned char *target,
                      unsigned char *pcr, size_t *stop, PyObject *entries)
{
    /* The whole text is ASCII without NUL and ends in a newline, as the reference asks first. */
    for (size_t i = 0; i < end; i++)
        if (buf[i] == 0 || buf[i] >= 0x80)
            return 0;
    if (end > 0 && buf[end - 1] != '\n')
        return 0;
    unsigned char td[48 + NAME_MAX_ASCII + 1];
    memcpy(td, PLAIN_DIGEST, sizeof PLAIN_DIGEST);
    size_t pos = 0;
    while (pos < end) {
        const unsigned char *line = buf + pos;
        size_t len = (size_t)((const unsigned char *)memchr(line, '\n', end - pos) - line);
        if (len < ASCII_HEAD || memcmp(line, "10 ", 3) != 0 || memcmp(line + 43, ASCII_MIDDLE, 15) != 0 ||
            line[122] != ' ')
            return 0;
        const unsigned char *name = line + ASCII_HEAD;
        size_t name_len = len - ASCII_HEAD;
        if (name_len > NAME_MAX_ASCII || memchr(name, ' ', name_len) != NULL)
            return 0;
        for (int i = 0; i < PCR_SIZE; i++) {
            int hi = nibble(line[58 + 2 * i]), lo = nibble(line[59 + 2 * i]);
            if (hi < 0 || lo < 0)
                return 0;
            td[12 + i] = (unsigned char)(hi << 4 | lo);
        }
        uint32_t field = (uint32_t)name_len + 1;
        td[44] = field & 0xff, td[45] = field >> 8 & 0xff, td[46] = field >> 16 & 0xff, td[47] = field >> 24;
        memcpy(td + 48, name, name_len);
        td[48 + name_len] = 0;
        int folded = fold_one(h, td, 48 + name_len + 1, NULL, (const char *)line + 3, pcr);
        if (folded <= 0) {
            if (folded < 0)
                PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not hash");
            return folded;
        }
        /* The digest column as written (either case of hex), as the reference keeps it. */
        int added = append(entries, (const char *)name, (Py_ssize_t)name_len,
                           PyUnicode_DecodeASCII((const char *)line + 58, 2 * PCR_SIZE, NULL));
        if (added <= 0)
            return added;
        pos += len + 1;
        if (target != NULL && memcmp(pcr, target, PCR_SIZE) == 0)
            break;
    }
    *stop = pos;
    return 1;
}

static PyObject *fold(PyObject *module, PyObject *args)
{
    Py_buffer data;
    int binary;
    PyObject *target_obj;
    if (!PyArg_ParseTuple(args, "y*pO:fold", &data, &binary, &target_obj))
        return NULL;
    const unsigned char *target = NULL;
    if (target_obj != Py_None) {
        if (!PyBytes_Check(target_obj)) {
            PyBuffer_Release(&data);
            PyErr_SetString(PyExc_TypeError, "target must be bytes or None");
            return NULL;
        }
        /* A value of another size is never reached, as in the reference. */
        if (PyBytes_GET_SIZE(target_obj) == PCR_SIZE)
            target = (const unsigned char *)PyBytes_AS_STRING(target_obj);
    }
    PyObject *entries = PyList_New(0), *result = NULL;
    hashers h = {EVP_MD_CTX_new(), EVP_MD_CTX_new()};
    if (entries == NULL || h.sha1 == NULL || h.sha256 == NULL) {
        if (entries != NULL)
            PyErr_NoMemory();
        goto out;
    }
    unsigned char pcr[PCR_SIZE] = {0};
    size_t stop = 0;
    int walked = (binary ? walk_binary : walk_ascii)(&h, data.buf, (size_t)data.len, target, pcr, &stop, entries);
    if (walked == 1)
        result = Py_BuildValue("(y#nO)", pcr, (Py_ssize_t)PCR_SIZE, (Py_ssize_t)stop, entries);
    else if (walked == 0)
        result = Py_NewRef(Py_None);
out:
    EVP_MD_CTX_free(h.sha1);
    EVP_MD_CTX_free(h.sha256);
    Py_XDECREF(entries);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"fold", fold, METH_VARARGS, "Fold a plain ima-ng list to its sha256 PCR 10 (see tvorch.core.attestation.ima)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, .m_name = "_ima_fold", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__ima_fold(void)
{
    sha1_md = EVP_MD_fetch(NULL, "SHA1", NULL);
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (sha1_md == NULL || sha256_md == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL offers no SHA-1 or SHA-256");
        return NULL;
    }
    return PyModule_Create(&module_def);
}
