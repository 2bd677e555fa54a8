/* qcow2fast: cipher modes over a block cipher, for the ciphers OpenSSL's
 * libcrypto lacks (Serpent, Twofish; AES-192 in XTS; CAST5) and that qemu
 * 7.2 takes from nettle.  The block cipher is nettle's shape: one call
 * en/decrypts `length` bytes of whole blocks, ECB, in place allowed.
 *
 * One sector (whole blocks) at a time, with its IV (block bytes):
 *   ECB  each block alone (no IV);
 *   CBC  C[i] = E(P[i] ^ C[i-1]), C[-1] = IV;
 *   CTR  keystream E(IV), E(IV+1), ... (the IV a big-endian counter over the
 *        whole block, as nettle's ctr_crypt), XORed in (both directions);
 *   XTS  IEEE P1619: T = E_k2(IV), C[i] = E_k1(P[i] ^ T_i) ^ T_i with
 *        T_{i+1} = T_i * x in GF(2^128) (little-endian, 0x87), as qemu's
 *        crypto/xts.c; 16-byte blocks only.
 * Functions are pure C, safe without the GIL; nettle's key schedules are
 * read only, so threads may share one.
 */
#ifndef QF_BLOCKMODES_H
#define QF_BLOCKMODES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define QF_MAX_BLOCK 16
#define QF_MAX_SECTOR 512

typedef void (*qf_block_fn)(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);

enum { QF_MODE_ECB = 0, QF_MODE_CBC = 1, QF_MODE_CTR = 2, QF_MODE_XTS = 3 };

typedef struct {
    qf_block_fn encrypt, decrypt;   /* the data key's two directions */
    const void *key_enc, *key_dec;  /* their key schedules (may be the same) */
    qf_block_fn tweak_encrypt;      /* XTS: the tweak key's encryption */
    const void *key_tweak;
    int block;                      /* block bytes: 8 or 16 */
    int mode;                       /* QF_MODE_* */
} qf_blockmode;

static inline void qf_xor(uint8_t *dst, const uint8_t *a, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        dst[i] ^= a[i];
}

/* T * x in GF(2^128), T little-endian (qemu's xts_mult_x). */
static inline void qf_xts_mult_x(uint8_t *t)
{
    int i, carry = t[15] >> 7;
    for (i = 15; i > 0; i--)
        t[i] = (uint8_t)((t[i] << 1) | (t[i - 1] >> 7));
    t[0] = (uint8_t)(t[0] << 1);
    if (carry)
        t[0] ^= 0x87;
}

/* En/decrypt one sector of `n` bytes (whole blocks, n <= QF_MAX_SECTOR) at
 * `p` in place with IV `iv`. */
static inline void qf_sector_crypt(const qf_blockmode *m, uint8_t *p, size_t n,
                                   const uint8_t *iv, int enc)
{
    uint8_t buf[QF_MAX_SECTOR];
    uint8_t t[QF_MAX_BLOCK];
    size_t bs = (size_t)m->block, i, k;
    switch (m->mode) {
    case QF_MODE_ECB:
        (enc ? m->encrypt : m->decrypt)(enc ? m->key_enc : m->key_dec, n, p, p);
        break;
    case QF_MODE_CBC:
        if (enc) {
            qf_xor(p, iv, bs);
            m->encrypt(m->key_enc, bs, p, p);
            for (i = bs; i < n; i += bs) {
                qf_xor(p + i, p + i - bs, bs);
                m->encrypt(m->key_enc, bs, p + i, p + i);
            }
        } else {
            /* All blocks decrypted in one call, then chained from the last
             * block back, while the previous ciphertext is still in p. */
            m->decrypt(m->key_dec, n, buf, p);
            for (i = n; i > bs; i -= bs) {
                qf_xor(buf + i - bs, p + i - 2 * bs, bs);
                memcpy(p + i - bs, buf + i - bs, bs);
            }
            qf_xor(buf, iv, bs);
            memcpy(p, buf, bs);
        }
        break;
    case QF_MODE_CTR:
        memcpy(t, iv, bs);
        for (i = 0; i < n; i += bs) {
            memcpy(buf + i, t, bs);
            for (k = bs; k-- > 0;)          /* big-endian increment */
                if (++t[k])
                    break;
        }
        m->encrypt(m->key_enc, n, buf, buf);
        qf_xor(p, buf, n);
        break;
    case QF_MODE_XTS:
        m->tweak_encrypt(m->key_tweak, 16, t, iv);
        for (i = 0; i < n; i += 16) {
            memcpy(buf + i, t, 16);
            qf_xts_mult_x(t);
        }
        qf_xor(p, buf, n);
        (enc ? m->encrypt : m->decrypt)(enc ? m->key_enc : m->key_dec, n, p, p);
        qf_xor(p, buf, n);
        break;
    }
}

#endif
