package org.spa.tools;

import java.io.ByteArrayOutputStream;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.zip.ZipEntry;
import java.util.zip.ZipInputStream;
import java.util.zip.ZipOutputStream;

import org.objectweb.asm.ClassReader;
import org.objectweb.asm.ClassVisitor;
import org.objectweb.asm.ClassWriter;
import org.objectweb.asm.ConstantDynamic;
import org.objectweb.asm.FieldVisitor;
import org.objectweb.asm.Handle;
import org.objectweb.asm.MethodVisitor;
import org.objectweb.asm.Opcodes;

/**
 * Rewrites a jar of Java 9+ class files so that the Android dexer of Debian (dx 1.16, Java 8
 * class files only) accepts them and ART runs them as the compiler meant:
 *
 * <ul>
 *   <li>the class file version becomes 52 (Java 8);
 *   <li>nest-based access (Java 11, JEP 181) is undone: the NestHost/NestMembers attributes are
 *       dropped and every private member of a class in a nest becomes package-private, so that
 *       the nestmates' direct accesses (a subclass calling its host's private constructor, an
 *       outer class reading an inner class's private field) still link; calls within a class to
 *       one of its own, formerly private, instance methods become invokevirtual (an
 *       invoke-direct on a non-private method fails ART's verifier);
 *   <li>calls that bind to Java 9+ signatures of Java 8 APIs are bound to the Java 8 ones: the
 *       covariant {@code ByteBuffer position(int)}, {@code limit}, {@code flip}, {@code clear},
 *       {@code mark}, {@code reset}, {@code rewind} of each {@code java.nio} buffer (a jar
 *       compiled by JDK 9+ without {@code --release 8} calls them; older phones lack them) become
 *       the {@code java.nio.Buffer} methods plus a cast, and {@code List.of()} / {@code List.of(x)}
 *       (Android 11+) become {@code Collections.emptyList()} / {@code singletonList(x)};
 *   <li>anything this pass cannot lower (invokedynamic, constant-dynamic, records, modules)
 *       stops it with the class named, instead of producing a dex that fails on a phone.
 * </ul>
 *
 * Usage: {@code Retarget IN.jar OUT.jar [--exclude PREFIX]...}: entries whose name starts with
 * an excluded prefix are left out, as is everything that is not a class file.
 */
public final class Retarget {
    private Retarget() {}

    public static void main(String[] args) throws IOException {
        if (args.length < 2) {
            System.err.println("usage: Retarget IN.jar OUT.jar [--exclude PREFIX]...");
            System.exit(2);
        }
        List<String> excluded = new ArrayList<String>();
        for (int i = 2; i < args.length; i++) {
            if (args[i].equals("--exclude") && i + 1 < args.length) excluded.add(args[++i]);
            else throw new IllegalArgumentException("unknown argument " + args[i]);
        }
        int written = 0, skipped = 0, widened = 0, lowered = 0;
        List<String> problems = new ArrayList<String>();
        try (ZipInputStream in = new ZipInputStream(new FileInputStream(args[0]));
             ZipOutputStream out = new ZipOutputStream(new FileOutputStream(args[1]))) {
            ZipEntry e;
            while ((e = in.getNextEntry()) != null) {
                String name = e.getName();
                if (e.isDirectory() || !name.endsWith(".class") || startsWithAny(name, excluded)) {
                    skipped++;
                    continue;
                }
                Result r = transform(readAll(in));
                problems.addAll(r.problems);
                widened += r.widened;
                lowered += r.lowered;
                out.putNextEntry(new ZipEntry(name));
                out.write(r.bytes);
                out.closeEntry();
                written++;
            }
        }
        if (!problems.isEmpty()) {
            for (String p : problems) System.err.println("retarget: " + p);
            System.err.println("retarget: " + problems.size() + " construct(s) cannot be lowered to Java 8; exclude those classes");
            System.exit(1);
        }
        System.out.println("retargeted " + args[0] + ": " + written + " classes to Java 8 (" + widened
                + " private members of nest classes made package-visible, " + lowered + " calls to Java 9+ signatures lowered; "
                + skipped + " entries left out)");
    }

    /** The rewritten class, how many members were widened, and what could not be lowered. */
    public static final class Result {
        public final byte[] bytes;
        public final int widened, lowered;
        public final List<String> problems;

        Result(byte[] bytes, int widened, int lowered, List<String> problems) {
            this.bytes = bytes;
            this.widened = widened;
            this.lowered = lowered;
            this.problems = problems;
        }
    }

    public static Result transform(byte[] classFile) {
        ClassReader reader = new ClassReader(classFile);
        // First look: is the class in a nest, and which of its instance methods are private?
        final boolean[] inNest = {false};
        final Set<String> privateInstanceMethods = new HashSet<String>();
        reader.accept(new ClassVisitor(Opcodes.ASM9) {
            @Override
            public void visitNestHost(String host) {
                inNest[0] = true;
            }

            @Override
            public void visitNestMember(String member) {
                inNest[0] = true;
            }

            @Override
            public MethodVisitor visitMethod(int access, String name, String desc, String sig, String[] exc) {
                if ((access & (Opcodes.ACC_PRIVATE | Opcodes.ACC_STATIC)) == Opcodes.ACC_PRIVATE && !name.equals("<init>")) {
                    privateInstanceMethods.add(name + desc);
                }
                return null;
            }
        }, ClassReader.SKIP_CODE);

        ClassWriter writer = new ClassWriter(0); // frames and maxima are kept as they are
        Lowering lowering = new Lowering(writer, inNest[0], privateInstanceMethods);
        reader.accept(lowering, 0);
        return new Result(writer.toByteArray(), lowering.widened, lowering.lowered, lowering.problems);
    }

    private static final class Lowering extends ClassVisitor {
        final boolean widen;
        final Set<String> privateInstanceMethods;
        final List<String> problems = new ArrayList<String>();
        int widened, lowered;
        String owner;

        Lowering(ClassVisitor next, boolean widen, Set<String> privateInstanceMethods) {
            super(Opcodes.ASM9, next);
            this.widen = widen;
            this.privateInstanceMethods = privateInstanceMethods;
        }

        @Override
        public void visit(int version, int access, String name, String sig, String superName, String[] interfaces) {
            owner = name;
            if ((access & Opcodes.ACC_RECORD) != 0) problems.add(name + ": a record");
            if ((access & Opcodes.ACC_MODULE) != 0) problems.add(name + ": a module descriptor");
            int major = version & 0xFFFF;
            super.visit(Math.min(major, Opcodes.V1_8), access, name, sig, superName, interfaces);
        }

        @Override
        public void visitNestHost(String host) {
            // dropped: Java 8 has no nests; access is widened instead
        }

        @Override
        public void visitNestMember(String member) {
            // dropped
        }

        @Override
        public void visitPermittedSubclass(String sub) {
            problems.add(owner + ": a sealed class");
        }

        @Override
        public void visitInnerClass(String name, String outer, String inner, int access) {
            super.visitInnerClass(name, outer, inner, widen ? unprivate(access) : access);
        }

        @Override
        public FieldVisitor visitField(int access, String name, String desc, String sig, Object value) {
            return super.visitField(widen ? unprivate(access) : access, name, desc, sig, value);
        }

        @Override
        public MethodVisitor visitMethod(int access, final String name, String desc, String sig, String[] exc) {
            final String where = owner + "." + name + desc;
            MethodVisitor mv = super.visitMethod(widen ? unprivate(access) : access, name, desc, sig, exc);
            return new MethodVisitor(Opcodes.ASM9, mv) {
                @Override
                public void visitMethodInsn(int op, String o, String n, String d, boolean itf) {
                    if (op == Opcodes.INVOKEVIRTUAL && isNioBuffer(o) && BUFFER_METHODS.contains(n + d.substring(0, d.indexOf(')') + 1))
                            && d.endsWith(")L" + o + ";")) {
                        super.visitMethodInsn(op, "java/nio/Buffer", n, d.substring(0, d.indexOf(')') + 1) + "Ljava/nio/Buffer;", false);
                        super.visitTypeInsn(Opcodes.CHECKCAST, o);
                        lowered++;
                        return;
                    }
                    if (op == Opcodes.INVOKESTATIC && o.equals("java/util/List") && n.equals("of")) {
                        if (d.equals("()Ljava/util/List;")) {
                            super.visitMethodInsn(op, "java/util/Collections", "emptyList", d, false);
                            lowered++;
                            return;
                        }
                        if (d.equals("(Ljava/lang/Object;)Ljava/util/List;")) {
                            super.visitMethodInsn(op, "java/util/Collections", "singletonList", d, false);
                            lowered++;
                            return;
                        }
                        problems.add(where + ": List.of" + d);
                    }
                    if (widen && op == Opcodes.INVOKESPECIAL && o.equals(owner) && privateInstanceMethods.contains(n + d)) {
                        op = itf ? Opcodes.INVOKEINTERFACE : Opcodes.INVOKEVIRTUAL;
                    }
                    super.visitMethodInsn(op, o, n, d, itf);
                }

                @Override
                public void visitInvokeDynamicInsn(String n, String d, Handle bsm, Object... bsmArgs) {
                    problems.add(where + ": invokedynamic via " + bsm.getOwner() + "." + bsm.getName());
                    super.visitInvokeDynamicInsn(n, d, bsm, bsmArgs);
                }

                @Override
                public void visitLdcInsn(Object value) {
                    if (value instanceof ConstantDynamic) problems.add(where + ": a dynamic constant");
                    super.visitLdcInsn(value);
                }
            };
        }

        private int unprivate(int access) {
            if ((access & Opcodes.ACC_PRIVATE) == 0) return access;
            widened++;
            return access & ~Opcodes.ACC_PRIVATE;
        }
    }

    private static final Set<String> BUFFER_METHODS = new HashSet<String>(java.util.Arrays.asList(
            "position(I)", "limit(I)", "flip()", "clear()", "mark()", "reset()", "rewind()"));

    private static boolean isNioBuffer(String owner) {
        return owner.startsWith("java/nio/") && owner.endsWith("Buffer") && !owner.equals("java/nio/Buffer")
                && owner.indexOf('/', "java/nio/".length()) < 0;
    }

    private static boolean startsWithAny(String name, List<String> prefixes) {
        for (String p : prefixes) if (name.startsWith(p)) return true;
        return false;
    }

    private static byte[] readAll(InputStream in) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] buf = new byte[1 << 16];
        int n;
        while ((n = in.read(buf)) > 0) out.write(buf, 0, n);
        return out.toByteArray();
    }
}
