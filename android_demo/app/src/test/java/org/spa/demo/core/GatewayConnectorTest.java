package org.spa.demo.core;

import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.io.FileOutputStream;

import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;
import org.spa.protocol.ClientException;
import org.spa.protocol.OutputHead;

/** Where the app finds the output head for settlement, and what a bad one does. */
public class GatewayConnectorTest {
    @Rule
    public TemporaryFolder tmp = new TemporaryFolder();

    @Test
    public void noHeadOnThePhoneMeansNoSettlement() throws Exception {
        assertNull(new GatewayConnector(4, true, true, tmp.getRoot()).headFor("abc123"));
        assertNull(new GatewayConnector(4, true, true, null).headFor("abc123")); // settlement off
    }

    @Test
    public void aCorruptHeadIsAOneLineErrorNamingTheFile() throws Exception {
        File file = new File(tmp.getRoot(), OutputHead.cachedPath("abc123").getName());
        FileOutputStream out = new FileOutputStream(file);
        out.write(new byte[] {1, 2, 3, 4, 5, 6, 7, 8, 9});
        out.close();
        try {
            new GatewayConnector(4, true, true, tmp.getRoot()).headFor("abc123");
            fail("a corrupt head was used");
        } catch (ClientException e) {
            assertTrue(e.getMessage(), e.getMessage().contains(file.getPath()) && e.getMessage().contains("settlement"));
        }
    }
}
