/*
 * Fused CPU loops of the exact momentum iteration: the "native" backend
 * (invertnet/momentum/backends/native.py), one loop per phase.
 *
 * Each loop does in one pass over memory what the reference backend
 * (invertnet/momentum/backends/tensor.py) does with five to ten tensor
 * operations, and gives the same bits: the state holds
 * whole numbers below 2**50 in doubles, every operation on them is exact, and
 * the one rounding, of the update (1 - gamma) f to units, is the same double
 * multiplication and rounding half to even as torch's. Built with
 * -ffp-contract=off, so that no multiplication is fused with the addition after
 * it (which would round the update differently from torch).
 *
 * The callers check everything (device, dtype, contiguity, shapes, ranges);
 * these functions take raw addresses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* MSVC's C compiler knows restrict only in its C11 mode; __restrict always. */
#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict
#endif

/* x86-64 Linux: compile each loop for AVX2 and for the baseline, and pick one when
 * the module loads (the baseline's 2-wide vectors are about half as fast). */
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

/* 1.5 * 2**52. For |a| < 2**51, a + ROUNDER lies in [2**52, 2**53), where doubles
 * are spaced 1 apart, so the addition rounds a to a whole number (half to even,
 * in the default rounding mode) and the subtraction is exact. */
#define ROUNDER 6755399441055744.0

static inline double round_half_even(double a) { return (a + ROUNDER) - ROUNDER; }

/* Floor division by b of whole numbers below 2**50, with no division (the proof
 * is in invertnet.momentum.fixed_point.floor_divmod): round((1 - b) / (2 b) + a / b). */
typedef struct {
    double value, inverse, offset;
} divisor;

static inline divisor divisor_of(double b) {
    divisor q = {b, 1.0 / b, (1.0 - b) / (2.0 * b)};
    return q;
}

static inline double floor_quotient(double a, divisor b) {
    return round_half_even(b.offset + a * b.inverse);
}

/* The magnitude of a as a 64-bit integer: the bits of |a|, which order as the
 * magnitudes do, with NaN above infinity. Integer maxima vectorise, and keep NaN,
 * where floating-point ones need -ffast-math. */
static inline int64_t magnitude_bits(double a) {
    int64_t bits;
    memcpy(&bits, &a, sizeof bits);
    return bits & INT64_MAX;
}

static inline double bits_to_double(int64_t bits) {
    double a;
    memcpy(&a, &bits, sizeof a);
    return a;
}

static inline int64_t max_bits(int64_t a, int64_t b) { return a > b ? a : b; }

/* The loop of a forward step, with the function's step f (F: y, or y - x) and the
 * product n v + r computed directly (SPLIT 0: exact while d |v| < 2**50) or split
 * (SPLIT 1: v = a d + b with 0 <= b < d, so that n v + r = a n d + (b n + r) and
 * every intermediate is exact for any velocity in range). Both give the same bits.
 * F and SPLIT are constants: each combination is its own loop, vectorised. */
#define ADVANCE_LOOP(T, F, SPLIT)                                                          \
    for (Py_ssize_t i = 0; i < size; i++) {                                                \
        const double f = F;                                                                \
        const double update = round_half_even(f * mix_units);                              \
        const double a = SPLIT ? floor_quotient(v[i], by_d) : 0.0;                         \
        const double b = SPLIT ? v[i] - a * d : v[i];                                      \
        const double head = floor_quotient(z[i], by_n);                                    \
        const double p = (z[i] - head * n) + n * b;                                        \
        const double high = floor_quotient(p, by_d);                                       \
        z[i] = (p - high * d) + d * head;                                                  \
        v[i] = (SPLIT ? high + n * a : high) + update;                                     \
        x[i] += v[i] * unit;                                                               \
        x_out[i] = (T)x[i];                                                                \
        peak_update = max_bits(peak_update, magnitude_bits(update));                       \
        peak_x = max_bits(peak_x, magnitude_bits(x[i]));                                   \
        peak_v = max_bits(peak_v, magnitude_bits(v[i]));                                   \
    }

/* The loop that undoes a step's velocity and store: the inverse of ADVANCE_LOOP, with
 * w = v - update: d w + s directly (SPLIT 0), or with w = e n + f, 0 <= f < n, as
 * e d n + (f d + s) (SPLIT 1). */
#define RETREAT_LOOP(F, SPLIT)                                                             \
    for (Py_ssize_t i = 0; i < size; i++) {                                                \
        const double f = F;                                                                \
        const double w = v[i] - round_half_even(f * mix_units);                            \
        const double e = SPLIT ? floor_quotient(w, by_n) : 0.0;                            \
        const double rest = SPLIT ? w - e * n : w;                                         \
        const double head = floor_quotient(z[i], by_d);                                    \
        const double p = (z[i] - head * d) + d * rest;                                     \
        const double high = floor_quotient(p, by_n);                                       \
        z[i] = (p - high * n) + n * head;                                                  \
        v[i] = SPLIT ? high + d * e : high;                                                \
    }

/* One set of loops per dtype T of the functions' inputs and outputs. */
#define DEFINE_LOOPS(T, SUFFIX)                                                            \
    /* Forward step: v <- gamma v + update, x <- x + v, store digits, x as T. The          \
     * largest magnitudes of the update, the position and the velocity go to peaks. */     \
    VECTOR_CLONES static void advance_##SUFFIX(                                            \
        double *restrict z, double *restrict v, double *restrict x, const T *restrict y,   \
        T *restrict x_out, Py_ssize_t size, double n, double d, double mix_units,          \
        double unit, int residual, int split, int64_t peaks[3]) {                          \
        const divisor by_n = divisor_of(n), by_d = divisor_of(d);                          \
        int64_t peak_update = 0, peak_x = 0, peak_v = 0;                                   \
        if (residual && split)                                                             \
            ADVANCE_LOOP(T, (double)y[i], 1)                                               \
        else if (residual)                                                                 \
            ADVANCE_LOOP(T, (double)y[i], 0)                                               \
        else if (split)                                                                    \
            ADVANCE_LOOP(T, (double)y[i] - x[i], 1)                                        \
        else                                                                               \
            ADVANCE_LOOP(T, (double)y[i] - x[i], 0)                                        \
        peaks[0] = peak_update;                                                            \
        peaks[1] = peak_x;                                                                 \
        peaks[2] = peak_v;                                                                 \
    }                                                                                      \
                                                                                           \
    /* Backward, before the function: x <- x - v, x as T, grad_y = (1 - gamma) g_v. */     \
    VECTOR_CLONES static void retreat_position_##SUFFIX(                                   \
        const double *restrict v, double *restrict x, const double *restrict grad_v,       \
        T *restrict x_out, T *restrict grad_y, Py_ssize_t size, double unit, double mix) { \
        for (Py_ssize_t i = 0; i < size; i++) {                                            \
            x[i] -= v[i] * unit;                                                           \
            x_out[i] = (T)x[i];                                                            \
            grad_y[i] = (T)(grad_v[i] * mix);                                              \
        }                                                                                  \
    }                                                                                      \
                                                                                           \
    /* Backward, after the function: undo the velocity step and the store. */              \
    VECTOR_CLONES static void retreat_velocity_##SUFFIX(                                   \
        double *restrict z, double *restrict v, const double *restrict x,                  \
        const T *restrict y, Py_ssize_t size, double n, double d, double mix_units,        \
        int residual, int split) {                                                         \
        const divisor by_n = divisor_of(n), by_d = divisor_of(d);                          \
        if (residual && split)                                                             \
            RETREAT_LOOP((double)y[i], 1)                                                  \
        else if (residual)                                                                 \
            RETREAT_LOOP((double)y[i], 0)                                                  \
        else if (split)                                                                    \
            RETREAT_LOOP((double)y[i] - x[i], 1)                                           \
        else                                                                               \
            RETREAT_LOOP((double)y[i] - x[i], 0)                                           \
    }                                                                                      \
                                                                                           \
    /* Backward, after the vjp: g_x += found; g_v <- g_x + gamma g_v. */                   \
    VECTOR_CLONES static void backpropagate_##SUFFIX(                                      \
        double *restrict grad_x, double *restrict grad_v, const T *restrict found,         \
        Py_ssize_t size, double keep, double mix, int residual) {                          \
        for (Py_ssize_t i = 0; i < size; i++) {                                            \
            double g = grad_x[i];                                                          \
            if (found != NULL) g += (double)found[i];                                      \
            if (!residual) g -= mix * grad_v[i];                                           \
            grad_x[i] = g;                                                                 \
            grad_v[i] = g + keep * grad_v[i];                                              \
        }                                                                                  \
    }

DEFINE_LOOPS(float, f32)
DEFINE_LOOPS(double, f64)

/* Addresses come as Python ints (torch.Tensor.data_ptr()); is_double selects T. */
#define ADDRESS(a) ((void *)(uintptr_t)(a))

static PyObject *advance(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long z, v, x, y, x_out;
    Py_ssize_t size;
    double n, d, mix_units, unit;
    int residual, split, is_double;
    int64_t peaks[3] = {0, 0, 0};
    if (!PyArg_ParseTuple(args, "KKKKKnddddppp", &z, &v, &x, &y, &x_out, &size, &n, &d,
                          &mix_units, &unit, &residual, &split, &is_double))
        return NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (is_double)
        advance_f64(ADDRESS(z), ADDRESS(v), ADDRESS(x), ADDRESS(y), ADDRESS(x_out), size, n, d,
                 mix_units, unit, residual, split, peaks);
    else
        advance_f32(ADDRESS(z), ADDRESS(v), ADDRESS(x), ADDRESS(y), ADDRESS(x_out), size, n, d,
                 mix_units, unit, residual, split, peaks);
    Py_END_ALLOW_THREADS;
    /* The largest magnitudes of the update (units), the position (its value) and the
     * velocity (units); NaN where one was NaN. */
    return Py_BuildValue("(ddd)", bits_to_double(peaks[0]), bits_to_double(peaks[1]),
                         bits_to_double(peaks[2]));
}

static PyObject *retreat_position(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long v, x, grad_v, x_out, grad_y;
    Py_ssize_t size;
    double unit, mix;
    int is_double;
    if (!PyArg_ParseTuple(args, "KKKKKnddp", &v, &x, &grad_v, &x_out, &grad_y, &size, &unit,
                          &mix, &is_double))
        return NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (is_double)
        retreat_position_f64(ADDRESS(v), ADDRESS(x), ADDRESS(grad_v), ADDRESS(x_out),
                            ADDRESS(grad_y), size, unit, mix);
    else
        retreat_position_f32(ADDRESS(v), ADDRESS(x), ADDRESS(grad_v), ADDRESS(x_out),
                            ADDRESS(grad_y), size, unit, mix);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *retreat_velocity(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long z, v, x, y;
    Py_ssize_t size;
    double n, d, mix_units;
    int residual, split, is_double;
    if (!PyArg_ParseTuple(args, "KKKKndddppp", &z, &v, &x, &y, &size, &n, &d, &mix_units,
                          &residual, &split, &is_double))
        return NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (is_double)
        retreat_velocity_f64(ADDRESS(z), ADDRESS(v), ADDRESS(x), ADDRESS(y), size, n, d,
                            mix_units, residual, split);
    else
        retreat_velocity_f32(ADDRESS(z), ADDRESS(v), ADDRESS(x), ADDRESS(y), size, n, d,
                            mix_units, residual, split);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *backpropagate(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long grad_x, grad_v, found;
    Py_ssize_t size;
    double keep, mix;
    int residual, is_double;
    if (!PyArg_ParseTuple(args, "KKKnddpp", &grad_x, &grad_v, &found, &size, &keep, &mix,
                          &residual, &is_double))
        return NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (is_double)
        backpropagate_f64(ADDRESS(grad_x), ADDRESS(grad_v), ADDRESS(found), size, keep, mix,
                       residual);
    else
        backpropagate_f32(ADDRESS(grad_x), ADDRESS(grad_v), ADDRESS(found), size, keep, mix,
                       residual);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyMethodDef native_methods[] = {
    {"advance", advance, METH_VARARGS,
     "advance(z, v, x, y, x_out, size, n, d, mix_units, unit, residual, split, is_double) -> "
     "(largest update, position, velocity)"},
    {"retreat_position", retreat_position, METH_VARARGS,
     "retreat_position(v, x, grad_v, x_out, grad_y, size, unit, mix, is_double)"},
    {"retreat_velocity", retreat_velocity, METH_VARARGS,
     "retreat_velocity(z, v, x, y, size, n, d, mix_units, residual, split, is_double)"},
    {"backpropagate", backpropagate, METH_VARARGS,
     "backpropagate(grad_x, grad_v, found, size, keep, mix, residual, is_double); found may be 0"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "invertnet.momentum.backends._native",
    .m_doc = "Fused CPU loops of the exact momentum iteration (invertnet.momentum.backends.native).",
    .m_size = -1,
    .m_methods = native_methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
