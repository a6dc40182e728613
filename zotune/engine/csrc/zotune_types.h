/* Generated from zotune/engine/native.py (its enums and ctypes mirrors): do not edit.
   Regenerate with `python -m zotune.engine.native --write-header`. */
#ifndef ZOTUNE_TYPES_H
#define ZOTUNE_TYPES_H

#include <stddef.h>
#include <stdint.h>

enum { ZT_LAW_GAUSSIAN = 0, ZT_LAW_RADEMACHER = 1 };  /* Law */
enum { ZT_MASK_NONE = 0, ZT_MASK_MAGNITUDE = 1, ZT_MASK_RANDOM = 2, ZT_MASK_KEPT = 3 };  /* MaskKind */
enum { ZT_UPD_NONE = 0, ZT_UPD_SGD = 1, ZT_UPD_SIGN = 2, ZT_UPD_MOMENTUM = 3, ZT_UPD_ADAM = 4, ZT_UPD_HESSIAN = 5, ZT_UPD_WINDOW_ADAM = 6 };  /* UpdateMode */

/* What keeps a perturbed unit invertible, owned by the kernel from the move that perturbs the
   unit to the move that restores it (Python only swaps whole tables: MeZO-SVRG's anchor). */
typedef struct {
    uint8_t *bits;              /* one bit per element: its theta is kept aside; NULL when none is */
    float *aside;               /* those thetas in element order, + 8 floats of slack */
    uint8_t *mask;              /* the perturbation's mask as bits, or NULL */
    uint64_t mask_key;          /* the random mask's key, when mask is one (ZT_MASK_RANDOM) */
    int64_t count;              /* floats in aside */
} zt_rec;

/* One term c·z(seed) of an update's estimate g, its seed entered as derive_seed's state after
   it (see zt_pass). */
typedef struct {
    uint64_t s;
    double c;
} zt_coeff;

/* An update's terms, shared by the units whose rule arguments agree (typically a param
   group's): the rule (mode, constants) and g = c_1·z(s_1) + ... + c_n·z(s_n), summed in that
   order (rules.estimate's; the window-adam mode weighs each term by its place instead). */
typedef struct {
    int64_t mode;               /* an UpdateMode (ZT_UPD_*) */
    double upd_lr;
    int64_t has_decay;
    double upd_decay;
    double h[7];                /* the rule's constants */
    const zt_coeff *coeffs;     /* the n terms of g, in order */
    int64_t ncoeffs;            /* n (0 without an update) */
} zt_terms;

/* A low-rank direction's factors for one matrix and step seed: z's element i·width + c is L[i,
   0]·Rt[0, c] + L[i, 1]·Rt[1, c] + ..., summed in that order (directions.outer_). */
typedef struct {
    uint64_t key;               /* derive_seed(step seed, tensor key): the z it stands for */
    const float *left;          /* L, rows x rank, row-major */
    const float *right_t;       /* Rt, rank x width, row-major */
    int64_t width;
    int64_t rank;
} zt_factors;

/* One unit (elements start .. start + n of a tensor), built once per space (with its view of
   the space's H, when z is scaled by one); its terms and state buffers are set before each pass
   that updates, and a low-rank direction's factors before each pass. */
typedef struct {
    float *flat;
    int64_t n;
    int64_t start;
    uint64_t key;
    int64_t offsets;            /* 0: a row-lazy table's unit, at theta0 through every pass */
    double mask_h;              /* the magnitude mask's threshold */
    int64_t mask_tie;           /* its tie limit (MagnitudeMask.tie_limit; 2^32: all ties) */
    const zt_terms *terms;
    float *m;
    float *v;
    const float *hess;          /* z's per-element H (z/sqrt(H): HiZOO), or NULL */
    const zt_factors *factors;  /* a low-rank z's factors per seed, or NULL */
    int64_t nfactors;           /* how many (0: z is the pass's element-wise law) */
} zt_unit;

/* What a pass shares: the offsets' and the mask's seeds enter as the state of derive_seed after
   their first part, s = splitmix64(0x5EED ^ seed), and each unit's key is mixed in by the
   kernel. */
typedef struct {
    int64_t law;                /* a Law (ZT_LAW_*) */
    const float *cells;         /* the gaussian law's table */
    int64_t has_cur;
    uint64_t cur_s;
    double cur_scale;
    int64_t update;
    int64_t has_tgt;
    uint64_t tgt_s;
    double tgt_scale;
    int64_t mask_kind;          /* a MaskKind (ZT_MASK_*): NONE, MAGNITUDE or RANDOM */
    uint64_t mask_s;
    int64_t mask_limit;
} zt_pass;

/* zt_move_rows's arguments: rows `rows` (nrows of them) of the [rows x width] tensor flat,
   moved from the current offset to the target without an update; keys are the units' own
   (derive_seed's, not states), flags, masks and kept-aside values are the rows' one after
   another; with factors, z is the low-rank product (a row's z is L[row]·Rt). */
typedef struct {
    float *flat;
    int64_t width;              /* a multiple of 8 */
    const int64_t *rows;
    int64_t nrows;
    int64_t law;                /* a Law (ZT_LAW_*) */
    const float *cells;
    int64_t has_cur;
    uint64_t key_cur;
    float cur_scale;
    const uint8_t *bits_in;
    const float *aside_in;
    int64_t has_tgt;
    uint64_t key_tgt;
    float tgt_scale;
    uint8_t *bits_out;
    float *aside_out;           /* 8 floats of slack */
    int64_t mask_kind;          /* a MaskKind (ZT_MASK_*) */
    float mask_h;
    const uint8_t *mask_in;
    uint8_t *mask_out;
    uint64_t mask_key;
    int64_t mask_limit;
    const zt_factors *factors;  /* a low-rank z's factors per key, or NULL */
    int64_t nfactors;
} zt_rows;

#define ZT_FIELD(s, f) (int64_t)offsetof(s, f), (int64_t)sizeof(((s *)0)->f)
#define ZT_LAYOUT { \
    (int64_t)sizeof(zt_rec), 5, \
    ZT_FIELD(zt_rec, bits), \
    ZT_FIELD(zt_rec, aside), \
    ZT_FIELD(zt_rec, mask), \
    ZT_FIELD(zt_rec, mask_key), \
    ZT_FIELD(zt_rec, count), \
    (int64_t)sizeof(zt_coeff), 2, \
    ZT_FIELD(zt_coeff, s), \
    ZT_FIELD(zt_coeff, c), \
    (int64_t)sizeof(zt_terms), 7, \
    ZT_FIELD(zt_terms, mode), \
    ZT_FIELD(zt_terms, upd_lr), \
    ZT_FIELD(zt_terms, has_decay), \
    ZT_FIELD(zt_terms, upd_decay), \
    ZT_FIELD(zt_terms, h), \
    ZT_FIELD(zt_terms, coeffs), \
    ZT_FIELD(zt_terms, ncoeffs), \
    (int64_t)sizeof(zt_factors), 5, \
    ZT_FIELD(zt_factors, key), \
    ZT_FIELD(zt_factors, left), \
    ZT_FIELD(zt_factors, right_t), \
    ZT_FIELD(zt_factors, width), \
    ZT_FIELD(zt_factors, rank), \
    (int64_t)sizeof(zt_unit), 13, \
    ZT_FIELD(zt_unit, flat), \
    ZT_FIELD(zt_unit, n), \
    ZT_FIELD(zt_unit, start), \
    ZT_FIELD(zt_unit, key), \
    ZT_FIELD(zt_unit, offsets), \
    ZT_FIELD(zt_unit, mask_h), \
    ZT_FIELD(zt_unit, mask_tie), \
    ZT_FIELD(zt_unit, terms), \
    ZT_FIELD(zt_unit, m), \
    ZT_FIELD(zt_unit, v), \
    ZT_FIELD(zt_unit, hess), \
    ZT_FIELD(zt_unit, factors), \
    ZT_FIELD(zt_unit, nfactors), \
    (int64_t)sizeof(zt_pass), 12, \
    ZT_FIELD(zt_pass, law), \
    ZT_FIELD(zt_pass, cells), \
    ZT_FIELD(zt_pass, has_cur), \
    ZT_FIELD(zt_pass, cur_s), \
    ZT_FIELD(zt_pass, cur_scale), \
    ZT_FIELD(zt_pass, update), \
    ZT_FIELD(zt_pass, has_tgt), \
    ZT_FIELD(zt_pass, tgt_s), \
    ZT_FIELD(zt_pass, tgt_scale), \
    ZT_FIELD(zt_pass, mask_kind), \
    ZT_FIELD(zt_pass, mask_s), \
    ZT_FIELD(zt_pass, mask_limit), \
    (int64_t)sizeof(zt_rows), 24, \
    ZT_FIELD(zt_rows, flat), \
    ZT_FIELD(zt_rows, width), \
    ZT_FIELD(zt_rows, rows), \
    ZT_FIELD(zt_rows, nrows), \
    ZT_FIELD(zt_rows, law), \
    ZT_FIELD(zt_rows, cells), \
    ZT_FIELD(zt_rows, has_cur), \
    ZT_FIELD(zt_rows, key_cur), \
    ZT_FIELD(zt_rows, cur_scale), \
    ZT_FIELD(zt_rows, bits_in), \
    ZT_FIELD(zt_rows, aside_in), \
    ZT_FIELD(zt_rows, has_tgt), \
    ZT_FIELD(zt_rows, key_tgt), \
    ZT_FIELD(zt_rows, tgt_scale), \
    ZT_FIELD(zt_rows, bits_out), \
    ZT_FIELD(zt_rows, aside_out), \
    ZT_FIELD(zt_rows, mask_kind), \
    ZT_FIELD(zt_rows, mask_h), \
    ZT_FIELD(zt_rows, mask_in), \
    ZT_FIELD(zt_rows, mask_out), \
    ZT_FIELD(zt_rows, mask_key), \
    ZT_FIELD(zt_rows, mask_limit), \
    ZT_FIELD(zt_rows, factors), \
    ZT_FIELD(zt_rows, nfactors), \
}
/* the names of ZT_LAYOUT's pairs, one word each */
#define ZT_LAYOUT_NAMES \
    "zt_rec zt_rec.bits zt_rec.aside zt_rec.mask zt_rec.mask_key zt_rec.count " \
    "zt_coeff zt_coeff.s zt_coeff.c " \
    "zt_terms zt_terms.mode zt_terms.upd_lr zt_terms.has_decay zt_terms.upd_decay zt_terms.h zt_terms.coeffs zt_terms.ncoeffs " \
    "zt_factors zt_factors.key zt_factors.left zt_factors.right_t zt_factors.width zt_factors.rank " \
    "zt_unit zt_unit.flat zt_unit.n zt_unit.start zt_unit.key zt_unit.offsets zt_unit.mask_h zt_unit.mask_tie zt_unit.terms zt_unit.m zt_unit.v zt_unit.hess zt_unit.factors zt_unit.nfactors " \
    "zt_pass zt_pass.law zt_pass.cells zt_pass.has_cur zt_pass.cur_s zt_pass.cur_scale zt_pass.update zt_pass.has_tgt zt_pass.tgt_s zt_pass.tgt_scale zt_pass.mask_kind zt_pass.mask_s zt_pass.mask_limit " \
    "zt_rows zt_rows.flat zt_rows.width zt_rows.rows zt_rows.nrows zt_rows.law zt_rows.cells zt_rows.has_cur zt_rows.key_cur zt_rows.cur_scale zt_rows.bits_in zt_rows.aside_in zt_rows.has_tgt zt_rows.key_tgt zt_rows.tgt_scale zt_rows.bits_out zt_rows.aside_out zt_rows.mask_kind zt_rows.mask_h zt_rows.mask_in zt_rows.mask_out zt_rows.mask_key zt_rows.mask_limit zt_rows.factors zt_rows.nfactors " \
    ""

#endif
