package org.spa.demo.core;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.ByteArrayInputStream;
import java.io.File;
import java.io.IOException;
import java.io.InputStream;

import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;
import org.spa.protocol.Files2;

/** The picked-plugin import, bounded reads, the share rule and loadMethod's return code. */
public class SmallPartsTest {
    @Rule
    public TemporaryFolder tmp = new TemporaryFolder();

    @Test
    public void displayNamesAreSanitized() {
        assertEquals("plugin-fp32.pte", PluginImport.sanitize("plugin-fp32.pte"));
        assertEquals("passwd.pte", PluginImport.sanitize("../../etc/passwd"));
        assertEquals("evil.pte", PluginImport.sanitize("..\\..\\evil.PTE"));
        assertEquals("my_plugin_v2_.pte", PluginImport.sanitize("my plugin (v2).pte"));
        assertEquals("plugin.pte", PluginImport.sanitize(null));
        assertEquals("plugin.pte", PluginImport.sanitize("..."));
        assertEquals(64, PluginImport.sanitize(new String(new char[300]).replace('\0', 'x') + ".pte").length());
    }

    @Test
    public void aDifferentFileWithTheSameNameGetsItsOwnPathAndTheSameFileIsReused() throws IOException {
        File dir = new File(tmp.getRoot(), "plugins");
        File a = PluginImport.copy(new ByteArrayInputStream(new byte[] {1, 2, 3}), dir, "plugin.pte");
        File b = PluginImport.copy(new ByteArrayInputStream(new byte[] {4, 5, 6}), dir, "plugin.pte");
        File again = PluginImport.copy(new ByteArrayInputStream(new byte[] {1, 2, 3}), dir, "plugin.pte");
        assertNotEquals(a, b);
        assertEquals(a, again);
        assertArrayEquals(new byte[] {1, 2, 3}, Files2.readBytes(a));
        assertArrayEquals(new byte[] {4, 5, 6}, Files2.readBytes(b));
        assertTrue(a.getName(), a.getName().matches("plugin-[0-9a-f]{12}\\.pte"));
        assertEquals("no temporary files left", 2, dir.list().length);
    }

    @Test
    public void aFailedCopyLeavesNoFileBehind() {
        File dir = new File(tmp.getRoot(), "plugins");
        InputStream failing = new InputStream() {
            int n;

            @Override
            public int read() throws IOException {
                if (n++ > 100000) throw new IOException("the provider went away");
                return 7;
            }
        };
        try {
            PluginImport.copy(failing, dir, "plugin.pte");
            fail("copied a failing stream");
        } catch (IOException expected) {
            assertEquals("the provider went away", expected.getMessage());
        }
        assertEquals(0, dir.list().length);
        try {
            PluginImport.copy(new ByteArrayInputStream(new byte[2000]), dir, "big.pte", 1000);
            fail("copied past the limit");
        } catch (IOException expected) {
            assertTrue(expected.getMessage().contains("larger than"));
        }
        assertEquals(0, dir.list().length);
    }

    @Test
    public void readsOfSharedContentAreBounded() throws IOException {
        assertEquals(5, BoundedRead.readAll(new ByteArrayInputStream(new byte[5]), 5).length);
        try {
            BoundedRead.readAll(new ByteArrayInputStream(new byte[6 << 20]), BoundedRead.MAX_DOCUMENT_BYTES);
            fail("read 6 MB");
        } catch (IOException expected) {
            assertTrue(expected.getMessage().contains("larger than 4 MB"));
        }
    }

    @Test
    public void aSharedFileWinsOverItsCaption() {
        assertEquals(SharedContent.Source.STREAM, SharedContent.choose(true, "Shared from Files"));
        assertEquals(SharedContent.Source.TEXT, SharedContent.choose(false, "The paper's text"));
        assertEquals(SharedContent.Source.NONE, SharedContent.choose(false, "  "));
        assertEquals(SharedContent.Source.NONE, SharedContent.choose(false, null));
    }

    /** The Maven AAR's Module: loadMethod returns an error code. */
    public static final class IntModule {
        public int loadMethod(String name) {
            return name.equals("gate") ? 0 : 0x22;
        }
    }

    /** The npm build's Module: loadMethod returns nothing and throws. */
    public static final class VoidModule {
        public void loadMethod(String name) {
            if (!name.equals("gate")) throw new IllegalArgumentException("no method " + name);
        }
    }

    @Test
    public void loadMethodErrorCodesAreNotIgnored() {
        NativeModules.loadMethod(new IntModule(), "gate");
        try {
            NativeModules.loadMethod(new IntModule(), "side");
            fail("error code 0x22 ignored");
        } catch (ExecuTorchErrors.PluginRuntimeException expected) {
            assertEquals(0x22, expected.errorCode);
            assertTrue(expected.getMessage(), expected.getMessage().contains("AccessFailed (0x22)"));
        }
        NativeModules.loadMethod(new VoidModule(), "gate");
        try {
            NativeModules.loadMethod(new VoidModule(), "side");
            fail("exception swallowed");
        } catch (ExecuTorchErrors.PluginRuntimeException expected) {
            assertEquals(-1, expected.errorCode); // the exception named no code
            assertTrue(expected.getCause() instanceof IllegalArgumentException);
            assertTrue(expected.getMessage(), expected.getMessage().endsWith("no method side"));
        }
    }

    @Test
    public void nativeErrorsAreDescribedByWhatIsMissing() {
        assertTrue(Failures.describe(new UnsatisfiedLinkError("couldn't find \"libexecutorch.so\"")).contains("libexecutorch.so"));
        assertTrue(Failures.describe(new NoClassDefFoundError("org/pytorch/executorch/Module")).contains("Module"));
        assertTrue(Failures.isFatal(new UnsatisfiedLinkError("x")));
        assertFalse(Failures.isFatal(new IllegalStateException("x")));
        assertEquals("IllegalStateException: x", Failures.describe(new IllegalStateException("x")));
    }
}
