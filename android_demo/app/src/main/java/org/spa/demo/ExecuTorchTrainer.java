package org.spa.demo;

import java.io.File;
import java.io.IOException;
import java.io.RandomAccessFile;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.channels.FileChannel;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;

import org.pytorch.executorch.EValue;
import org.pytorch.executorch.Tensor;
import org.pytorch.executorch.training.SGD;
import org.pytorch.executorch.training.TrainingModule;
import org.spa.demo.core.PluginTrainer;
import org.spa.protocol.Json;
import org.spa.protocol.TeachSession;

/**
 * The plugin's training program on the phone: ExecuTorch's TrainingModule runs `side_loss` (or
 * `mix_loss` on the cloud's projections), forward and backward with the loss first, and
 * ExecuTorch's SGD applies AdamW's step with learning rate 1 (ExecuTorch ships only SGD; the
 * moments are kept here, as spa/model/train_program.py does). The output head, an input of the
 * loss, is the backbone's head file (spa/model/output_head.py's .safetensors, pushed beside the
 * plugin), memory-mapped.
 *
 * <p>The app's recipe is the side network only, for {@link #epochs} epochs over the reader's kept
 * examples (AdamW, lr 1e-3, batches of 64 tokens), with the gate and tau as they were: a Teach
 * adds one example at a time, too few to hold any out. `spa personalize` runs the whole recipe
 * (the gate, tau on held-out examples). Compiled against the ExecuTorch Java API; never run on a
 * phone by this project (no phone was available).
 */
public final class ExecuTorchTrainer implements PluginTrainer {
    static final int BATCH = 64;
    private final File head;
    private final int epochs;

    public ExecuTorchTrainer(File head, int epochs) {
        this.head = head;
        this.epochs = epochs;
    }

    @Override
    public Learned learn(File program, File weights, List<TeachSession.ExampleStates> examples, double tau,
                         Progress progress) throws IOException {
        List<float[][]> x = new ArrayList<float[][]>();
        List<float[]> f = new ArrayList<float[]>();
        List<Long> targets = new ArrayList<Long>();
        for (TeachSession.ExampleStates e : examples) {
            for (int i = 0; i < e.rows(); i++) {
                x.add(e.x[i]);
                f.add(e.f[i]);
                targets.add(e.targets[i]);
            }
        }
        if (x.isEmpty()) throw new IOException("no states to learn from");
        int taps = x.get(0).length, cols = x.get(0)[0].length, hidden = f.get(0).length;
        String method = cols == hidden ? "side_loss" : "mix_loss";
        long[] headShape = new long[2];
        Tensor headTensor = Tensor.fromBlob(mapHead(head, headShape), headShape);
        TrainingModule module = TrainingModule.load(program.getPath(), weights.getPath());
        try {
            AdamW adam = new AdamW(1e-3, 0.01);
            SGD sgd = null;
            Random random = new Random(0);
            int n = x.size(), batches = (n + BATCH - 1) / BATCH, total = epochs * batches, done = 0;
            Map<String, Tensor> params = null;
            for (int epoch = 0; epoch < epochs; epoch++) {
                int[] order = permutation(n, random);
                for (int start = 0; start < n; start += BATCH) {
                    int rows = Math.min(BATCH, n - start);
                    float[] xb = new float[BATCH * taps * cols], fb = new float[BATCH * hidden], wb = new float[BATCH];
                    long[] tb = new long[BATCH];
                    for (int r = 0; r < rows; r++) {
                        int i = order[start + r];
                        for (int t = 0; t < taps; t++) System.arraycopy(x.get(i)[t], 0, xb, (r * taps + t) * cols, cols);
                        System.arraycopy(f.get(i), 0, fb, r * hidden, hidden);
                        tb[r] = targets.get(i);
                        wb[r] = 1f;
                    }
                    module.executeForwardBackward(method, EValue.from(Tensor.fromBlob(xb, new long[] {BATCH, taps, cols})),
                            EValue.from(Tensor.fromBlob(fb, new long[] {BATCH, hidden})),
                            EValue.from(Tensor.fromBlob(tb, new long[] {BATCH})),
                            EValue.from(Tensor.fromBlob(wb, new long[] {BATCH})), EValue.from(headTensor));
                    params = module.namedParameters(method);
                    if (sgd == null) sgd = SGD.create(params, 1.0);
                    sgd.step(adam.steps(params, module.namedGradients(method)));
                    progress.step(++done, total);
                }
            }
            Map<String, float[]> learned = new LinkedHashMap<String, float[]>();
            for (Map.Entry<String, Tensor> e : params.entrySet()) learned.put(e.getKey(), e.getValue().getDataAsFloatArray());
            Map<String, Object> record = new LinkedHashMap<String, Object>();
            record.put("recipe", "side network only (" + method + "), gate and tau kept; ExecuTorch on the phone");
            record.put("epochs", (long) epochs);
            record.put("tokens", (long) n);
            return new Learned(learned, tau, record);
        } finally {
            module.close();
        }
    }

    /** The head's weight [V, H] float32 from its .safetensors file, memory-mapped (no copy in Java's heap). */
    static FloatBuffer mapHead(File file, long[] shape) throws IOException {
        RandomAccessFile raf = new RandomAccessFile(file, "r");
        try {
            FileChannel ch = raf.getChannel();
            ByteBuffer len = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN);
            ch.read(len, 0);
            long headerLen = len.getLong(0);
            ByteBuffer header = ByteBuffer.allocate((int) headerLen);
            ch.read(header, 8);
            Map<String, Object> h = Json.parseObject(new String(header.array(), "UTF-8"));
            Map<?, ?> w = (Map<?, ?>) h.get("weight");
            if (w == null || !"F32".equals(w.get("dtype"))) throw new IOException(file + " holds no float32 head weight");
            List<?> s = (List<?>) w.get("shape"), off = (List<?>) w.get("data_offsets");
            shape[0] = ((Number) s.get(0)).longValue();
            shape[1] = ((Number) s.get(1)).longValue();
            long begin = 8 + headerLen + ((Number) off.get(0)).longValue();
            long size = ((Number) off.get(1)).longValue() - ((Number) off.get(0)).longValue();
            return ch.map(FileChannel.MapMode.READ_ONLY, begin, size).order(ByteOrder.nativeOrder()).asFloatBuffer();
        } finally {
            raf.close(); // the mapping stays valid after the channel closes
        }
    }

    private static int[] permutation(int n, Random random) {
        int[] p = new int[n];
        for (int i = 0; i < n; i++) p[i] = i;
        for (int i = n - 1; i > 0; i--) {
            int j = random.nextInt(i + 1), t = p[i];
            p[i] = p[j];
            p[j] = t;
        }
        return p;
    }

    /** torch.optim.AdamW's step (default betas, eps), as what ExecuTorch's SGD subtracts with lr 1. */
    static final class AdamW {
        private final double lr, wd;
        private final Map<String, float[]> m = new LinkedHashMap<String, float[]>(), v = new LinkedHashMap<String, float[]>();
        private int t;

        AdamW(double lr, double weightDecay) {
            this.lr = lr;
            this.wd = weightDecay;
        }

        Map<String, Tensor> steps(Map<String, Tensor> params, Map<String, Tensor> grads) {
            t++;
            double bc1 = 1 - Math.pow(0.9, t), bc2 = 1 - Math.pow(0.999, t);
            float stepSize = (float) (lr / bc1), sqrtBc2 = (float) Math.sqrt(bc2), decay = (float) (lr * wd);
            Map<String, Tensor> out = new LinkedHashMap<String, Tensor>();
            for (Map.Entry<String, Tensor> e : grads.entrySet()) {
                float[] g = e.getValue().getDataAsFloatArray(), w = params.get(e.getKey()).getDataAsFloatArray();
                float[] mm = m.get(e.getKey()), vv = v.get(e.getKey());
                if (mm == null) {
                    mm = new float[g.length];
                    vv = new float[g.length];
                    m.put(e.getKey(), mm);
                    v.put(e.getKey(), vv);
                }
                float[] delta = new float[g.length];
                for (int i = 0; i < g.length; i++) {
                    mm[i] += (g[i] - mm[i]) * 0.1f;
                    vv[i] = vv[i] * 0.999f + g[i] * g[i] * 0.001f;
                    float denom = (float) Math.sqrt(vv[i]) / sqrtBc2 + 1e-8f;
                    delta[i] = w[i] * decay + stepSize * mm[i] / denom;
                }
                out.put(e.getKey(), Tensor.fromBlob(delta, e.getValue().shape()));
            }
            return out;
        }
    }
}
