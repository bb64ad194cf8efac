package com.facebook.jni;

import java.lang.ref.PhantomReference;
import java.lang.ref.Reference;
import java.lang.ref.ReferenceQueue;
import java.util.Collections;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;

/**
 * Runs native clean-up after the Java object that owned native memory became unreachable,
 * without finalizers: each {@link Destructor} is a phantom reference to its owner, kept alive
 * in a registry until one daemon thread takes it from the reference queue and calls
 * {@link Destructor#destruct()} exactly there. {@code HybridData.resetNative()} may destruct
 * earlier, on the caller's thread; the destructor must then tolerate the late second call.
 */
public final class DestructorThread {
    private static final ReferenceQueue<Object> QUEUE = new ReferenceQueue<Object>();
    /** Destructors not yet run: a phantom reference that is not itself reachable is never enqueued. */
    private static final Set<Destructor> PENDING =
            Collections.newSetFromMap(new ConcurrentHashMap<Destructor, Boolean>());

    static {
        Thread thread = new Thread("HybridData DestructorThread") {
            @Override
            public void run() {
                while (true) {
                    try {
                        Reference<?> ref = QUEUE.remove();
                        if (ref instanceof Destructor) {
                            Destructor d = (Destructor) ref;
                            PENDING.remove(d);
                            d.destruct();
                        }
                    } catch (InterruptedException ignored) {
                        // keep serving: native memory must still be freed
                    } catch (Throwable t) {
                        // a failing destructor must not stop the others
                        System.err.println("DestructorThread: " + t);
                    }
                }
            }
        };
        thread.setDaemon(true);
        thread.start();
    }

    private DestructorThread() {}

    /** The clean-up of one owner object. Subclasses free native memory in {@link #destruct()}. */
    public abstract static class Destructor extends PhantomReference<Object> {
        public Destructor(Object owner) {
            super(owner, QUEUE);
            PENDING.add(this);
        }

        /** Frees what the owner held; called at most once by the thread, maybe earlier by the owner. */
        protected abstract void destruct();
    }

    /** How many destructors are waiting for their owner to become unreachable (for tests). */
    static int pending() {
        return PENDING.size();
    }
}
