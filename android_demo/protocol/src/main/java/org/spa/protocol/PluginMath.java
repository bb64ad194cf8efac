package org.spa.protocol;

/**
 * The float32 building blocks of spa/model/plugin.py: rms normalization, nn.Linear,
 * exact-erf GELU, softmax. Each output value is rounded to float32, as torch's
 * float32 tensors are; sums are accumulated in double so the result is at
 * least as close to the exact value as torch's (its summation order differs,
 * so outputs agree to a few float32 ulps, not bit for bit).
 */
public final class PluginMath {
    public static final float RMS_EPS = 1e-6f;

    private PluginMath() {}

    /** x / sqrt(mean(x^2) + eps) (spa.plugin.rms, no weights). */
    public static float[] rms(float[] x) {
        double sum = 0;
        for (float v : x) {
            float sq = v * v; // torch: x.pow(2) in float32
            sum += sq;
        }
        float mean = (float) (sum / x.length);
        float r = (float) (1.0 / Math.sqrt((double) (mean + RMS_EPS))); // torch.rsqrt of a float32
        float[] out = new float[x.length];
        for (int i = 0; i < x.length; i++) out[i] = x[i] * r;
        return out;
    }

    /** nn.Linear: w [out][in] stored row-major as out*in, plus bias [out]. */
    public static float[] linear(float[] w, float[] bias, float[] x, int out) {
        int in = x.length;
        if (w.length != out * in || bias.length != out) throw new IllegalArgumentException("linear: shape mismatch");
        float[] y = new float[out];
        for (int o = 0; o < out; o++) {
            double acc = bias[o];
            int base = o * in;
            for (int i = 0; i < in; i++) acc += (double) w[base + i] * x[i];
            y[o] = (float) acc;
        }
        return y;
    }

    /** nn.GELU() (approximate='none'): 0.5 x (1 + erf(x / sqrt 2)). */
    public static float gelu(float x) {
        double v = x;
        return (float) (0.5 * v * (1.0 + erf(v / Math.sqrt(2.0))));
    }

    public static float[] gelu(float[] x) {
        float[] out = new float[x.length];
        for (int i = 0; i < x.length; i++) out[i] = gelu(x[i]);
        return out;
    }

    /** softmax([a, b])[1] = 1 / (1 + exp(a - b)), the gate's p. */
    public static float softmax2Second(float a, float b) {
        double m = Math.max(a, b);
        double ea = Math.exp(a - m), eb = Math.exp(b - m);
        return (float) (eb / (ea + eb));
    }

    // erf: W. J. Cody, "Rational Chebyshev approximations for the error function",
    // Math. Comp. 23 (1969), as in his CALERF routine; accurate to ~1e-16 in double.
    private static final double[] A = {3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
        3.20937758913846947e03, 1.85777706184603153e-1};
    private static final double[] B = {2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
        2.84423683343917062e03};
    private static final double[] C = {5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
        2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03, 2.05107837782607147e03,
        1.23033935479799725e03, 2.15311535474403846e-8};
    private static final double[] D = {1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
        1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03, 3.43936767414372164e03,
        1.23033935480374942e03};
    private static final double[] P = {3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
        1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2};
    private static final double[] Q = {2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
        6.05183413124413191e-2, 2.33520497626869185e-3};
    private static final double ONE_OVER_SQRT_PI = 5.6418958354775628695e-1;

    /** The error function in double precision (java.lang.Math has none). */
    public static double erf(double x) {
        if (Double.isNaN(x)) return x;
        double y = Math.abs(x);
        if (y <= 0.5) {
            double ysq = y * y, num = A[4] * ysq, den = ysq;
            for (int i = 0; i < 3; i++) {
                num = (num + A[i]) * ysq;
                den = (den + B[i]) * ysq;
            }
            return x * (num + A[3]) / (den + B[3]);
        }
        double erfc; // erfc(y) for y > 0.5
        if (y <= 4.0) {
            double num = C[8] * y, den = y;
            for (int i = 0; i < 7; i++) {
                num = (num + C[i]) * y;
                den = (den + D[i]) * y;
            }
            erfc = scaledByExp(y, (num + C[7]) / (den + D[7]));
        } else if (y < 6.0) {
            double ysq = 1.0 / (y * y), num = P[5] * ysq, den = ysq;
            for (int i = 0; i < 4; i++) {
                num = (num + P[i]) * ysq;
                den = (den + Q[i]) * ysq;
            }
            double r = ysq * (num + P[4]) / (den + Q[4]);
            erfc = scaledByExp(y, (ONE_OVER_SQRT_PI - r) / y);
        } else {
            erfc = 0.0; // erfc(6) ~ 2e-17: erf is 1 in double
        }
        double e = (0.5 - erfc) + 0.5;
        return x < 0 ? -e : e;
    }

    /** r * exp(-y^2), with y^2 split so that exp loses no accuracy (Cody's trick). */
    private static double scaledByExp(double y, double r) {
        double ysq = Math.floor(y * 16.0) / 16.0;
        double del = (y - ysq) * (y + ysq);
        return Math.exp(-ysq * ysq) * Math.exp(-del) * r;
    }
}
