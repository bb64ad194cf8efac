package org.spa.demo.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertSame;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.FileOutputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.CountDownLatch;
import java.util.zip.ZipEntry;
import java.util.zip.ZipOutputStream;

import org.junit.After;
import org.junit.Test;
import org.pytorch.executorch.ExecutorchRuntimeException;

/**
 * What the JVM can show of the native runtime's handling (no phone here): the load order and
 * its idempotent, thread-safe initialisation; the 16 KB page check (ELF alignment read from an
 * APK, the page size from an auxiliary vector); ExecuTorch failures mapped to one exception
 * with the runtime's error code. Whether the libraries then load on a phone is not shown here.
 */
public class NativeRuntimeTest {
    @After
    public void forget() {
        NativeLibraries.resetForTests();
    }

    @Test
    public void executorchLoadsFirstAndOnceFromAnyNumberOfThreads() throws Exception {
        final List<String> loads = Collections.synchronizedList(new ArrayList<String>());
        final NativeLibraries.Loader loader = new NativeLibraries.Loader() {
            @Override
            public void load(String name) {
                loads.add(name);
            }
        };
        final CountDownLatch go = new CountDownLatch(1);
        List<Thread> threads = new ArrayList<Thread>();
        for (int i = 0; i < 8; i++) {
            Thread t = new Thread() {
                @Override
                public void run() {
                    try {
                        go.await();
                    } catch (InterruptedException e) {
                        return;
                    }
                    NativeLibraries.ensureLoaded(loader, null);
                }
            };
            t.start();
            threads.add(t);
        }
        go.countDown();
        for (Thread t : threads) t.join(10000);
        assertEquals(java.util.Arrays.asList("executorch", "fbjni"), loads);
        assertTrue(NativeLibraries.isLoaded());
    }

    @Test
    public void aFailedLoadIsThrownAgainAndNotRetried() {
        final int[] calls = {0};
        NativeLibraries.Loader broken = new NativeLibraries.Loader() {
            @Override
            public void load(String name) {
                calls[0]++;
                throw new UnsatisfiedLinkError("dlopen failed: library \"libfbjni.so\" not found");
            }
        };
        UnsatisfiedLinkError first = null;
        try {
            NativeLibraries.ensureLoaded(broken, null);
            fail("loaded");
        } catch (UnsatisfiedLinkError e) {
            first = e;
        }
        try {
            NativeLibraries.ensureLoaded(broken, null);
            fail("loaded");
        } catch (UnsatisfiedLinkError e) {
            assertSame(first, e);
        }
        assertEquals(1, calls[0]);
        assertTrue(Failures.describe(first).contains("libfbjni.so"));
    }

    @Test
    public void aSixteenKilobytePagePhoneIsToldSoInOneLineWithoutLoading() {
        Map<String, Long> apk = new TreeMap<String, Long>();
        apk.put("libc++_shared.so", 4096L);
        apk.put("libexecutorch.so", 16384L);
        apk.put("libfbjni.so", 4096L);
        assertNull(NativeLibraries.pageSizeProblem(4096, apk));
        String line = NativeLibraries.pageSizeProblem(16384, apk);
        assertTrue(line, line.startsWith("This phone uses 16 KB memory pages, and this APK's libc++_shared.so (4 KB) and libfbjni.so (4 KB) are aligned"));
        assertTrue(line.indexOf('\n') < 0);
        final boolean[] touched = {false};
        try {
            NativeLibraries.ensureLoaded(new NativeLibraries.Loader() {
                @Override
                public void load(String name) {
                    touched[0] = true;
                }
            }, line);
            fail("loaded");
        } catch (UnsupportedOperationException e) {
            assertEquals(line, Failures.describe(e));
        }
        assertTrue(!touched[0]);
        Map<String, Long> gradle = new TreeMap<String, Long>();
        gradle.put("libfbjni.so", 16384L);
        assertNull(NativeLibraries.pageSizeProblem(16384, gradle));
    }

    @Test
    public void loadAlignmentIsReadFromTheLibrariesInsideAnApk() throws Exception {
        File apk = File.createTempFile("spa-test", ".apk");
        apk.deleteOnExit();
        ZipOutputStream zip = new ZipOutputStream(new FileOutputStream(apk));
        put(zip, "lib/arm64-v8a/libfbjni.so", elf64(new long[] {0x1000, 0x1000}));
        put(zip, "lib/arm64-v8a/libexecutorch.so", elf64(new long[] {0x4000, 0x4000}));
        put(zip, "lib/x86_64/libfbjni.so", elf64(new long[] {0x10000}));
        put(zip, "classes.dex", new byte[] {1, 2, 3});
        zip.close();
        Map<String, Long> got = ElfAlignment.inApk(apk, "arm64-v8a");
        assertEquals(Long.valueOf(0x1000), got.get("libfbjni.so"));
        assertEquals(Long.valueOf(0x4000), got.get("libexecutorch.so"));
        assertEquals(2, got.size());
    }

    @Test
    public void thePageSizeComesFromTheAuxiliaryVector() throws Exception {
        ByteBuffer b = ByteBuffer.allocate(64).order(ByteOrder.LITTLE_ENDIAN);
        b.putLong(33).putLong(0x7fff0000L).putLong(6).putLong(16384).putLong(0).putLong(0);
        assertEquals(16384, PageSize.fromAuxv(b.array(), true, ByteOrder.LITTLE_ENDIAN));
        long here = PageSize.current(); // this JVM's own (Linux) process
        assertTrue(String.valueOf(here), here >= 4096 && Long.bitCount(here) == 1);
    }

    @Test
    public void executorchFailuresCarryTheRuntimesErrorCode() {
        ExecuTorchErrors.PluginRuntimeException e = ExecuTorchErrors.wrap("load /x/plugin.pte",
                new ExecutorchRuntimeException(ExecutorchRuntimeException.INVALID_PROGRAM, "Failed to load program"));
        assertEquals(0x23, e.errorCode);
        assertTrue(e.getMessage(), e.getMessage().contains("error InvalidProgram (0x23)"));
        assertTrue(e.getMessage(), e.getMessage().contains("newer ExecuTorch"));
        ExecuTorchErrors.PluginRuntimeException exec = ExecuTorchErrors.wrap("execute \"side\"",
                new RuntimeException("Execution of method side failed with status 0x12"));
        assertEquals(0x12, exec.errorCode); // an older runtime's message names the code
        assertEquals("InvalidArgument (0x12)", ExecuTorchErrors.name(0x12));
        assertEquals(-1, ExecuTorchErrors.wrap("execute", new RuntimeException("boom")).errorCode);
        assertSame(exec, ExecuTorchErrors.wrap("again", exec));
    }

    private static void put(ZipOutputStream zip, String name, byte[] data) throws Exception {
        zip.putNextEntry(new ZipEntry(name));
        zip.write(data);
        zip.closeEntry();
    }

    /** A minimal little-endian ELF64 header with one PT_LOAD per alignment. */
    static byte[] elf64(long[] aligns) {
        ByteBuffer b = ByteBuffer.allocate(64 + 56 * aligns.length).order(ByteOrder.LITTLE_ENDIAN);
        b.put(new byte[] {0x7f, 'E', 'L', 'F', 2, 1, 1, 0});
        b.putLong(32, 64); // e_phoff
        b.putShort(54, (short) 56); // e_phentsize
        b.putShort(56, (short) aligns.length);
        for (int i = 0; i < aligns.length; i++) {
            b.putInt(64 + 56 * i, 1); // PT_LOAD
            b.putLong(64 + 56 * i + 48, aligns[i]);
        }
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        out.write(b.array(), 0, b.capacity());
        return out.toByteArray();
    }
}
