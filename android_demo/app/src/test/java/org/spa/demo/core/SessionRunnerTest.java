package org.spa.demo.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;

/** MainActivity's session logic (SessionRunner), one test per "first five minutes" defect it fixes. */
public class SessionRunnerTest {
    @Rule
    public TemporaryFolder tmp = new TemporaryFolder();

    private String pte(String name, int bytes) throws IOException {
        File f = new File(tmp.getRoot(), name);
        FileOutputStream out = new FileOutputStream(f);
        out.write(new byte[bytes]);
        out.close();
        return f.getPath();
    }

    private static SessionRunner.Request request(String pte) {
        SessionRunner.Request r = new SessionRunner.Request();
        r.document = "A document.";
        r.ptePath = pte;
        r.url = "ws://127.0.0.1:8765";
        return r;
    }

    private static void await(CountDownLatch latch) throws InterruptedException {
        assertTrue("timed out", latch.await(10, TimeUnit.SECONDS));
    }

    @Test
    public void aNativeErrorFromTheExecutorEndsTheSessionWithAShownError() throws Exception {
        Fakes.Loader loader = new Fakes.Loader();
        loader.gateThrows = new UnsatisfiedLinkError("dlopen failed: library \"libexecutorch.so\" not found");
        SessionRunner runner = new SessionRunner(loader, new Fakes.Connector());
        Fakes.Ui ui = new Fakes.Ui();
        runner.attach(ui);
        assertTrue(runner.start(request(pte("a.pte", 10))));
        await(ui.ended); // the thread ended normally: the process lives on
        assertTrue(ui.failure, ui.failure.contains("ExecuTorch native runtime could not be loaded"));
        assertTrue(ui.failure, ui.failure.contains("libexecutorch.so"));
        assertTrue(ui.cause instanceof UnsatisfiedLinkError);
        assertTrue("the plugin of a broken runtime is closed", loader.loaded.get(0).closed);
        assertFalse(runner.running());
    }

    @Test
    public void aStaticInitializerFailureWhileLoadingIsExplained() throws Exception {
        Fakes.Loader loader = new Fakes.Loader();
        loader.loadThrows = new ExceptionInInitializerError(new UnsatisfiedLinkError("dlopen failed: library \"libfbjni.so\" not found"));
        SessionRunner runner = new SessionRunner(loader, new Fakes.Connector());
        Fakes.Ui ui = new Fakes.Ui();
        runner.attach(ui);
        runner.start(request(pte("a.pte", 10)));
        await(ui.ended);
        assertTrue(ui.failure, ui.failure.contains("libfbjni.so"));
        assertTrue(ui.lastStatus(), ui.lastStatus().startsWith("Failed: The ExecuTorch native runtime"));
    }

    @Test
    public void stopWhileThePluginLoadsEndsTheSessionBeforeConnecting() throws Exception {
        Fakes.Loader loader = new Fakes.Loader();
        loader.gate = new CountDownLatch(1);
        Fakes.Connector gateway = new Fakes.Connector();
        SessionRunner runner = new SessionRunner(loader, gateway);
        Fakes.Ui ui = new Fakes.Ui();
        runner.attach(ui);
        runner.start(request(pte("a.pte", 10)));
        await(loader.loading);
        runner.stop(); // the native load cannot be interrupted...
        assertEquals("Stopping…", ui.lastStatus());
        loader.gate.countDown(); // ...but once it returns, nothing more happens
        await(ui.ended);
        assertTrue(gateway.urls.isEmpty());
        assertEquals("Stopped before connecting.", ui.lastStatus());
        assertNull(ui.failure);
    }

    @Test
    public void stopWhileGeneratingCancelsTheConnection() throws Exception {
        Fakes.Connector gateway = new Fakes.Connector();
        gateway.running = new CountDownLatch(1);
        SessionRunner runner = new SessionRunner(new Fakes.Loader(), gateway);
        Fakes.Ui ui = new Fakes.Ui();
        runner.attach(ui);
        runner.start(request(pte("a.pte", 10)));
        // wait for run(), not connect(): a Stop between the two is "Stopped before connecting."
        while (!gateway.runStarted) Thread.sleep(5);
        runner.stop();
        await(ui.ended);
        assertTrue(gateway.cancelled);
        assertEquals("Stopped.", ui.lastStatus());
    }

    @Test
    public void aRecreatedScreenReattachesInsteadOfStartingASecondSession() throws Exception {
        Fakes.Connector gateway = new Fakes.Connector();
        gateway.running = new CountDownLatch(1);
        Fakes.Loader loader = new Fakes.Loader();
        SessionRunner runner = new SessionRunner(loader, gateway);
        Fakes.Ui first = new Fakes.Ui();
        runner.attach(first);
        String path = pte("a.pte", 10);
        assertTrue(runner.start(request(path)));
        while (gateway.urls.isEmpty()) Thread.sleep(5);
        Thread.sleep(50);
        // rotation: the old screen goes, a new one attaches and sees the summary so far
        runner.attach(null);
        Fakes.Ui second = new Fakes.Ui();
        runner.attach(second);
        assertEquals("aAa", second.text.toString());
        assertFalse("a second session (and a second Module) was started", runner.start(request(path)));
        gateway.running.countDown();
        await(second.ended);
        assertNotNull(second.done);
        assertEquals(1, loader.loaded.size());
        assertEquals(1, gateway.urls.size());
    }

    @Test
    public void theSamePathWithNewContentIsLoadedAfreshAndTheOldPluginClosed() throws Exception {
        Fakes.Loader loader = new Fakes.Loader();
        SessionRunner runner = new SessionRunner(loader, new Fakes.Connector());
        String path = pte("plugin-fp32.pte", 10);
        for (int round = 0; round < 3; round++) {
            if (round == 2) {
                pte("plugin-fp32.pte", 20); // pushed again over the old file
            }
            Fakes.Ui ui = new Fakes.Ui();
            runner.attach(ui);
            assertTrue(runner.start(request(path)));
            await(ui.ended);
            assertNotNull(ui.done);
        }
        assertEquals("reused for the same file, reloaded for the new one", 2, loader.loaded.size());
        assertTrue(loader.loaded.get(0).closed);
        assertFalse(loader.loaded.get(1).closed);
        runner.release();
        assertTrue("release frees the plugin", loader.loaded.get(1).closed);
        assertFalse(runner.start(request(path)));
    }
}
