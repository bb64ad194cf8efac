package org.spa.protocol;

/**
 * IEEE binary16 <-> binary32 without java.lang.Float.float16ToFloat (absent on
 * Android API 26). Both directions match numpy's astype bit for bit: widening
 * is exact, narrowing rounds to nearest, ties to even, subnormals included.
 */
public final class Half {
    private Half() {}

    /** The float32 value of half bits `h` (exact); the decoder in docs/PROTOCOL.md section 5. */
    public static float toFloat(int h) {
        int s = (h >>> 15) & 1, e = (h >>> 10) & 0x1f, m = h & 0x3ff;
        float v = e == 0 ? m * 0x1p-24f // zero and subnormals
                : e == 31 ? (m == 0 ? Float.POSITIVE_INFINITY : Float.NaN)
                : Float.intBitsToFloat(((e + 112) << 23) | (m << 13));
        return s == 1 ? -v : v;
    }

    /** Half bits of `f`, rounded to nearest even; |f| >= 65520 becomes infinity. */
    public static int fromFloat(float f) {
        int bits = Float.floatToRawIntBits(f);
        int sign = (bits >>> 16) & 0x8000;
        int abs = bits & 0x7fffffff;
        if (abs >= 0x7f800000) { // inf or NaN (keep NaN a quiet NaN)
            return sign | 0x7c00 | (abs > 0x7f800000 ? 0x200 : 0);
        }
        if (abs >= 0x477ff000) return sign | 0x7c00; // >= 65520 rounds past the largest half
        if (abs <= 0x33000000) return sign; // <= 2^-25: rounds to zero (2^-25 is a tie, to even 0)
        int e = abs >>> 23;
        if (e < 113) { // below 2^-14: a subnormal half, in units of 2^-24
            int mant = (abs & 0x7fffff) | 0x800000;
            int shift = 126 - e; // 14..24
            int h = mant >>> shift;
            int rem = mant & ((1 << shift) - 1);
            int halfway = 1 << (shift - 1);
            if (rem > halfway || (rem == halfway && (h & 1) == 1)) h++; // may carry into the smallest normal: correct
            return sign | h;
        }
        int h = ((e - 112) << 10) | ((abs >>> 13) & 0x3ff);
        int rem = abs & 0x1fff;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1) == 1)) h++; // a carry moves the exponent: correct
        return sign | h;
    }
}
