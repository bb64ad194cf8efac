package com.facebook.jni;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.lang.reflect.Field;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import com.facebook.soloader.nativeloader.NativeLoader;
import com.facebook.soloader.nativeloader.NativeLoaderDelegate;
import com.facebook.soloader.nativeloader.SystemDelegate;

import org.junit.Test;

/** The parts of the fbjni / NativeLoader classes (android_demo/jni-support) that run on a JVM. */
public class JniSupportTest {

    static final class CountingDestructor extends DestructorThread.Destructor {
        final CountDownLatch done = new CountDownLatch(1);
        int calls;

        CountingDestructor(Object owner) {
            super(owner);
        }

        @Override
        protected void destruct() {
            calls++;
            done.countDown();
        }
    }

    @Test
    public void destructorRunsOnceTheOwnerIsUnreachable() throws InterruptedException {
        Object owner = new Object();
        CountingDestructor d = new CountingDestructor(owner);
        System.gc();
        assertFalse("destructed while the owner is alive", d.done.await(200, TimeUnit.MILLISECONDS));
        owner = null; // only the phantom reference is left
        for (int i = 0; i < 100 && d.done.getCount() > 0; i++) {
            System.gc();
            d.done.await(100, TimeUnit.MILLISECONDS);
        }
        assertEquals("the destructor thread never ran the destructor", 0, d.done.getCount());
        Thread.sleep(50);
        assertEquals(1, d.calls);
    }

    @Test
    public void destructorsOfLiveOwnersStayRegistered() {
        List<Object> owners = new ArrayList<Object>();
        int before = DestructorThread.pending();
        for (int i = 0; i < 10; i++) {
            Object o = new Object();
            owners.add(o);
            new CountingDestructor(o); // the registry, not the caller, keeps it alive
        }
        System.gc();
        assertTrue(DestructorThread.pending() >= before + 10);
        assertEquals(10, owners.size());
    }

    private static void resetLoader() throws Exception {
        Field f = NativeLoader.class.getDeclaredField("delegate");
        f.setAccessible(true);
        f.set(null, null);
    }

    static final class Recording implements NativeLoaderDelegate {
        final List<String> loaded = new ArrayList<String>();

        @Override
        public boolean loadLibrary(String shortName, int flags) {
            loaded.add(shortName + ":" + flags);
            return true;
        }

        @Override
        public String getLibraryPath(String libName) {
            return "/fake/lib" + libName + ".so";
        }

        @Override
        public int getSoSourcesVersion() {
            return 7;
        }
    }

    @Test
    public void nativeLoaderNeedsADelegateAndKeepsTheFirst() throws Exception {
        resetLoader();
        try {
            assertFalse(NativeLoader.isInitialized());
            try {
                NativeLoader.loadLibrary("executorch");
                fail("loaded without a delegate");
            } catch (IllegalStateException e) {
                assertTrue(e.getMessage(), e.getMessage().contains("NativeLoader.init"));
            }
            Recording r = new Recording();
            NativeLoader.init(r);
            NativeLoader.init(r); // the same one again is fine
            NativeLoader.init(new Recording()); // so is another of its class (ExecuTorch's init race): r stays
            assertTrue(NativeLoader.isInitialized());
            try {
                NativeLoader.init(new SystemDelegate());
                fail("a delegate of another class was accepted");
            } catch (IllegalStateException expected) {
                // the first delegate stays
            }
            NativeLoader.initIfUninitialized(); // keeps r
            assertTrue(NativeLoader.loadLibrary("executorch"));
            assertTrue(NativeLoader.loadLibrary("fbjni", 1));
            assertEquals(Arrays.asList("executorch:0", "fbjni:1"), r.loaded);
            assertEquals("/fake/libx.so", NativeLoader.getLibraryPath("x"));
            assertEquals(7, NativeLoader.getSoSourcesVersion());
        } finally {
            resetLoader();
        }
    }

    /**
     * ExecuTorch's Module.<clinit> does {@code if (!isInitialized()) init(new SystemDelegate())}; a
     * class initializer on another thread (HybridData's initIfUninitialized) may install a delegate
     * between the check and the init. Neither may fail: a failed class initializer is permanent.
     */
    @Test
    public void concurrentFirstUsesOfTheLoaderNeverFail() throws Exception {
        for (int round = 0; round < 50; round++) {
            resetLoader();
            final java.util.concurrent.CountDownLatch go = new java.util.concurrent.CountDownLatch(1);
            final List<Throwable> failures = java.util.Collections.synchronizedList(new ArrayList<Throwable>());
            List<Thread> threads = new ArrayList<Thread>();
            for (int i = 0; i < 4; i++) {
                final boolean likeModule = i % 2 == 0;
                Thread t = new Thread() {
                    @Override
                    public void run() {
                        try {
                            go.await();
                            if (likeModule) {
                                if (!NativeLoader.isInitialized()) NativeLoader.init(new SystemDelegate());
                            } else {
                                NativeLoader.initIfUninitialized();
                            }
                        } catch (Throwable e) {
                            failures.add(e);
                        }
                    }
                };
                t.start();
                threads.add(t);
            }
            go.countDown();
            for (Thread t : threads) t.join(10000);
            assertEquals(new ArrayList<Throwable>(), failures);
            assertTrue(NativeLoader.isInitialized());
        }
        resetLoader();
    }

    @Test
    public void aMissingFbjniLibraryIsReportedByName() throws Exception {
        resetLoader();
        try {
            new HybridData();
            fail("HybridData loaded without libfbjni.so");
        } catch (UnsatisfiedLinkError e) { // the static initializer's error, as the app will see it
            assertTrue(e.getMessage(), e.getMessage().contains("fbjni"));
        } catch (NoClassDefFoundError e) { // a second attempt in the same JVM
            assertTrue(String.valueOf(e.getMessage()), String.valueOf(e).contains("HybridData"));
        } finally {
            resetLoader();
        }
    }

    @Test
    public void mapIteratorHelperLeavesEachEntryInItsFields() throws Exception {
        Map<String, Integer> map = new LinkedHashMap<String, Integer>();
        map.put("a", 1);
        map.put("b", 2);
        MapIteratorHelper it = new MapIteratorHelper(map);
        Field key = MapIteratorHelper.class.getDeclaredField("mKey");
        Field value = MapIteratorHelper.class.getDeclaredField("mValue");
        key.setAccessible(true);
        value.setAccessible(true);
        List<String> seen = new ArrayList<String>();
        while (it.hasNext()) seen.add(key.get(it) + "=" + value.get(it));
        assertEquals(Arrays.asList("a=1", "b=2"), seen);
        assertNull(key.get(it));
        assertFalse(it.hasNext());
    }

    @Test
    public void iteratorHelperLeavesEachElementInItsField() throws Exception {
        IteratorHelper it = new IteratorHelper(Arrays.asList("x", null, "z"));
        Field element = IteratorHelper.class.getDeclaredField("mElement");
        element.setAccessible(true);
        List<Object> seen = new ArrayList<Object>();
        while (it.hasNext()) seen.add(element.get(it));
        assertEquals(Arrays.asList("x", null, "z"), seen);
    }

    @Test
    public void cppExceptionsCarryMessageAndCode() {
        CppSystemErrorException e = new CppSystemErrorException("open failed", 2);
        assertEquals("open failed", e.getMessage());
        assertEquals(2, e.getErrorCode());
        assertTrue(new UnknownCppException() instanceof RuntimeException);
        assertEquals("boom", new UnknownCppException("boom").getMessage());
    }
}
